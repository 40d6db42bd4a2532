// The Swift API against the Rust API's results, bit for bit, on the fixtures the JVM test writes:
//   ACORN_KEEP_FIXTURES=/tmp/acorn-fixtures cargo test --release -p acorn-tests --test jvm_api
//   ACORN_FIXTURES=/tmp/acorn-fixtures swift test --package-path ios
// (needs macOS; this project's CI has no Swift toolchain, see ios/README.md).

import Acorn
import Foundation
import XCTest

final class AcornTests: XCTestCase {
    var dir = URL(fileURLWithPath: "/")
    var props: [String: String] = [:]

    override func setUpWithError() throws {
        guard let d = ProcessInfo.processInfo.environment["ACORN_FIXTURES"] else {
            throw AcornError(code: 102, message: "set ACORN_FIXTURES to a folder the jvm_api test wrote (ACORN_KEEP_FIXTURES)")
        }
        dir = URL(fileURLWithPath: d)
        let text = try String(contentsOf: dir.appendingPathComponent("fixtures.properties"), encoding: .utf8)
        for line in text.split(separator: "\n") {
            if let eq = line.firstIndex(of: "=") {
                props[String(line[..<eq])] = String(line[line.index(after: eq)...])
            }
        }
    }

    func path(_ key: String) -> String { dir.appendingPathComponent(props[key]!).path }

    func read<T>(_ key: String, _: T.Type) throws -> [T] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path(key)))
        return data.withUnsafeBytes { raw in
            (0..<(data.count / MemoryLayout<T>.size)).map {
                raw.loadUnaligned(fromByteOffset: $0 * MemoryLayout<T>.size, as: T.self)
            }
        }
    }

    func ints(_ key: String) -> [UInt32] { props[key]!.split(separator: ",").map { UInt32($0)! } }

    func testMiniLMEmbeddingsEqualRust() throws {
        let (batch, seq) = (Int(props["minilm.batch"]!)!, Int(props["minilm.seq"]!)!)
        let model = try Model(path: path("minilm.model"))
        let session = try model.session()
        let out = try session.run([
            "input_ids": Tensor(try read("minilm.ids", Int64.self), shape: [batch, seq]),
            "attention_mask": Tensor(try read("minilm.mask", Int64.self), shape: [batch, seq]),
        ])
        let got = try out[props["minilm.output"]!]!.floats()
        let want = try read("minilm.expected", Float.self)
        XCTAssertEqual(got.map(\.bitPattern), want.map(\.bitPattern))
    }

    func testVADStreamEqualsRust() throws {
        let audio = try read("vad.audio", Float.self)
        let want = try read("vad.expected", Float.self)
        let session = try Model(path: path("vad.model")).session()
        var state = try Tensor([Float](repeating: 0, count: 256), shape: [2, 1, 128])
        let sr = try Tensor([Int64(16000)], shape: [])
        var frame = [Float](repeating: 0, count: 576)
        var got: [Float] = []
        for c in 0..<(audio.count / 512) {
            let context = Array(frame[512..<576])
            frame.replaceSubrange(0..<64, with: context)
            frame.replaceSubrange(64..<576, with: audio[(c * 512)..<((c + 1) * 512)])
            let out = try session.run(["input": Tensor(frame, shape: [1, 576]), "state": state, "sr": sr])
            got.append(try out["output"]!.floats()[0])
            state = out["stateN"]!
        }
        XCTAssertEqual(got.map(\.bitPattern), want.map(\.bitPattern))
    }

    func testGreedyGenerationEqualsRust() throws {
        let want = ints("smollm2.expected")
        let generator = try Model(path: path("smollm2.model")).generator(maxContext: 256)
        var tokens: [UInt32] = []
        var text = ""
        try generator.generate(props["smollm2.prompt"]!, options: GenerateOptions(maxTokens: want.count)) { piece, token in
            tokens.append(token)
            text += piece
            return true
        }
        XCTAssertEqual(tokens, want)
        XCTAssertTrue(text.contains("Paris"), text)
    }

    func testStreamYieldsThePieces() async throws {
        let generator = try Model(path: path("smollm2.model")).generator(maxContext: 256)
        var text = ""
        for try await piece in generator.stream(props["smollm2.prompt"]!, options: GenerateOptions(maxTokens: 12)) {
            text += piece
        }
        XCTAssertTrue(text.contains("Paris"), text)
    }

    func testBadInputThrows() throws {
        XCTAssertThrowsError(try Model(path: "/nonexistent.acorn"))
        XCTAssertThrowsError(try Model(path: path("damaged")))
        let model = try Model(path: path("minilm.model"))
        let session = try model.session()
        XCTAssertThrowsError(try session.run(["input_ids": Tensor([Float](repeating: 0, count: 4), shape: [1, 4])])) {
            XCTAssertEqual(($0 as? AcornError)?.code, AcornError.input)
        }
        XCTAssertThrowsError(try Tensor([Float](repeating: 0, count: 5), shape: [2, 3]))
        XCTAssertThrowsError(try model.generator()) { XCTAssertEqual(($0 as? AcornError)?.code, AcornError.noText) }
    }
}
