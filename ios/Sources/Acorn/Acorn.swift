// Acorn's Swift API: a thin layer over the C ABI (runtime/ffi/include/acorn.h, imported as
// CAcorn). Every call maps a nonzero status to a thrown `AcornError` carrying the runtime's
// message; handles are numbers the library checks, so a closed object is an error, never a
// crash.
//
// Status and dtype codes are compared as numbers: the header declares their enums with a fixed
// int32_t type only for C23 and C++, so in C mode Swift sees `AcornStatus` as Int32.

import CAcorn
import Foundation

/// A failed call: `code` is the C API's status (1–9 the runtime's error kinds, 100+ the ABI's
/// own), `message` the runtime's explanation.
public struct AcornError: Error, CustomStringConvertible {
    public let code: Int32
    public let message: String

    public static let input: Int32 = 5
    public static let invalidHandle: Int32 = 101
    public static let busy: Int32 = 103
    public static let noText: Int32 = 104
    public static let panic: Int32 = 105

    public var description: String { "Acorn error \(code): \(message)" }
}

@inline(__always)
func check(_ status: Int32) throws {
    if status != 0 {
        throw AcornError(code: status, message: String(cString: acorn_last_error()))
    }
}

/// A count the C API takes as uint32: a negative or oversized one is an error, not clamped.
func count(_ v: Int, _ what: String) throws -> UInt32 {
    guard let n = UInt32(exactly: v) else {
        throw AcornError(code: 102, message: "\(what) \(v) is negative or too large")
    }
    return n
}

/// Element types (the C API's `AcornDtype` codes).
public enum DType: Int32 {
    case f32 = 1, f16, i8, u8, i32, i64, bool, f64, i16, u16, u32, u64
    /// bfloat16 bits; the sub-byte integers one per byte (signed ones sign-extended); the 8-bit
    /// floats, FP4 (one per byte) and E8M0 as their bits.
    case bf16, i4, u4, i2, u2, f8e4m3fn, f8e4m3fnuz, f8e5m2, f8e5m2fnuz, f4e2m1, f8e8m0

    public var byteSize: Int {
        switch self {
        case .i8, .u8, .bool, .i4, .u4, .i2, .u2, .f8e4m3fn, .f8e4m3fnuz, .f8e5m2, .f8e5m2fnuz, .f4e2m1, .f8e8m0: return 1
        case .f16, .i16, .u16, .bf16: return 2
        case .f32, .i32, .u32: return 4
        case .f64, .i64, .u64: return 8
        }
    }
}

/// A dense row-major tensor: dtype, shape and its elements' bytes (little endian).
public struct Tensor {
    public let dtype: DType
    public let shape: [Int]
    public let bytes: [UInt8]

    public var count: Int { shape.reduce(1, *) }

    public init(bytes: [UInt8], dtype: DType, shape: [Int]) throws {
        guard shape.allSatisfy({ $0 >= 0 }), shape.reduce(1, *) * dtype.byteSize == bytes.count else {
            throw AcornError(
                code: 102, message: "\(bytes.count) bytes are not a \(dtype) tensor of shape \(shape)")
        }
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
    }

    public init(_ values: [Float], shape: [Int]) throws {
        try self.init(bytes: values.withUnsafeBytes { Array($0) }, dtype: .f32, shape: shape)
    }

    public init(_ values: [Int64], shape: [Int]) throws {
        try self.init(bytes: values.withUnsafeBytes { Array($0) }, dtype: .i64, shape: shape)
    }

    public init(_ values: [Int32], shape: [Int]) throws {
        try self.init(bytes: values.withUnsafeBytes { Array($0) }, dtype: .i32, shape: shape)
    }

    private func elements<T>(_ want: DType, _: T.Type) throws -> [T] {
        guard dtype == want else {
            throw AcornError(code: 102, message: "a \(dtype) tensor read as \(want)")
        }
        return bytes.withUnsafeBytes { raw in
            (0..<count).map { raw.loadUnaligned(fromByteOffset: $0 * MemoryLayout<T>.size, as: T.self) }
        }
    }

    public func floats() throws -> [Float] { try elements(.f32, Float.self) }
    public func int64s() throws -> [Int64] { try elements(.i64, Int64.self) }
    public func int32s() throws -> [Int32] { try elements(.i32, Int32.self) }
}

/// What a model declares about an input or output (-1: a size chosen at run time; nil: no
/// declared shape).
public struct TensorInfo {
    public let name: String
    public let dtype: DType?
    public let shape: [Int]?
}

/// A memory-mapped `.acorn` model, shared by any number of sessions and generators.
public final class Model {
    let handle: AcornModel

    /// Opens (memory-maps) a model file.
    public init(path: String) throws {
        var m = AcornModel()
        try check(acorn_model_open(path, &m))
        handle = m
    }

    /// Opens a model from bytes in memory (copied).
    public init(data: Data) throws {
        var m = AcornModel()
        try data.withUnsafeBytes { raw in
            try check(acorn_model_open_bytes(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, &m))
        }
        handle = m
    }

    deinit { _ = acorn_model_free(handle) }

    public var inputs: [TensorInfo] { get throws { try io(output: false) } }
    public var outputs: [TensorInfo] { get throws { try io(output: true) } }

    private func io(output: Bool) throws -> [TensorInfo] {
        var n = 0
        try check(output ? acorn_model_output_count(handle, &n) : acorn_model_input_count(handle, &n))
        return try (0..<n).map { i in
            var info = AcornIoInfo()
            try check(output ? acorn_model_output(handle, i, &info) : acorn_model_input(handle, i, &info))
            let shape = info.rank < 0 ? nil : (0..<Int(info.rank)).map { Int(info.shape[$0]) }
            return TensorInfo(name: String(cString: info.name), dtype: DType(rawValue: info.dtype), shape: shape)
        }
    }

    /// A new session with `threads` workers.
    public func session(threads: Int = 1) throws -> Session { try Session(model: self, threads: threads) }

    /// A text generator (the model must carry a tokenizer) with a KV cache of `maxContext`
    /// positions (0: 2048).
    public func generator(threads: Int = 1, maxContext: Int = 0) throws -> Generator {
        try Generator(model: self, threads: threads, maxContext: maxContext)
    }
}

/// Runs a model with its own buffers; one run at a time (calls from several threads wait).
public final class Session {
    let handle: AcornSession
    private let lock = NSLock()

    init(model: Model, threads: Int) throws {
        var s = AcornSession()
        try check(acorn_session_new(model.handle, count(threads, "threads"), &s))
        handle = s
    }

    deinit { _ = acorn_session_free(handle) }

    /// Runs on named inputs; returns every output by name (copied: valid after the next run).
    public func run(_ inputs: [String: Tensor]) throws -> [String: Tensor] {
        lock.lock()
        defer { lock.unlock() }
        // The views point into buffers owned here until the call returns: names, shapes, and
        // the elements copied to memory aligned for any dtype.
        var owned: [(UnsafeMutablePointer<CChar>, UnsafeMutablePointer<Int64>, UnsafeMutableRawPointer)] = []
        defer {
            for (name, shape, data) in owned {
                free(name)
                shape.deallocate()
                data.deallocate()
            }
        }
        var views: [AcornTensor] = []
        for (name, t) in inputs {
            let cname = strdup(name)!
            let shape = UnsafeMutablePointer<Int64>.allocate(capacity: max(t.shape.count, 1))
            for (i, d) in t.shape.enumerated() { shape[i] = Int64(d) }
            let data = UnsafeMutableRawPointer.allocate(byteCount: max(t.bytes.count, 1), alignment: 16)
            t.bytes.withUnsafeBytes { data.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            owned.append((cname, shape, data))
            views.append(
                AcornTensor(
                    name: cname, dtype: t.dtype.rawValue, shape: shape, rank: t.shape.count,
                    data: data, byte_len: t.bytes.count))
        }
        try check(acorn_session_run(handle, views, views.count))
        var n = 0
        try check(acorn_session_output_count(handle, &n))
        var out: [String: Tensor] = [:]
        for i in 0..<n {
            var t = AcornTensor()
            try check(acorn_session_output(handle, i, &t))
            let shape = (0..<t.rank).map { Int(t.shape[$0]) }
            let bytes = t.byte_len == 0 ? [] : Array(UnsafeRawBufferPointer(start: t.data, count: t.byte_len))
            guard let dtype = DType(rawValue: t.dtype) else {
                throw AcornError(code: 102, message: "output of unknown dtype code \(t.dtype)")
            }
            out[String(cString: t.name)] = try Tensor(bytes: bytes, dtype: dtype, shape: shape)
        }
        return out
    }
}

/// How the tokens after the first are computed (exit heads come from `acorn convert --exits`).
public enum Decoding {
    /// Every token through every layer.
    case plain
    /// Self-speculative: `draftTokens` drafted by the exit after `exitLayer`, verified by the
    /// full model; greedy output is plain decoding's.
    case speculative(exitLayer: Int, draftTokens: Int = 4)
    /// Self-speculative at the setting predicted fastest; plain decoding where none pays.
    case auto
    /// Per-token early exit (lossy) at this top probability.
    case earlyExit(threshold: Float)
}

/// How to pick tokens: greedy when `temperature` is 0, decoded as `decoding` says.
public struct GenerateOptions {
    public var maxTokens: Int = 64
    public var temperature: Float = 0
    public var topK: Int = 0
    public var topP: Float = 1
    public var seed: UInt64 = 0
    public var decoding: Decoding = .plain

    public init(
        maxTokens: Int = 64, temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0,
        decoding: Decoding = .plain
    ) {
        self.maxTokens = maxTokens
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
        self.decoding = decoding
    }
}

/// What one generation did.
public struct GenerationStats {
    public let promptTokens: Int
    public let generatedTokens: Int
    public let prefillMs: Double
    public let decodeMs: Double
    /// 0 max tokens, 1 a stop token, 2 the context is full, 3 cancelled.
    public let stopReason: Int32
    /// Self-speculative decoding: drafts accepted per verification (else 0).
    public let acceptedPerDraft: Double
    /// Layers run per token after the first.
    public let meanLayersPerToken: Double
}

private final class TokenSink {
    let onToken: (String, UInt32) -> Bool
    init(_ f: @escaping (String, UInt32) -> Bool) { onToken = f }
}

/// Text generation with the model's KV cache and embedded tokenizer; the conversation goes on
/// across calls until `reset()`.
public final class Generator {
    let handle: AcornGenerator

    init(model: Model, threads: Int, maxContext: Int) throws {
        var g = AcornGenerator()
        try check(acorn_generator_new(model.handle, count(threads, "threads"), count(maxContext, "maxContext"), &g))
        handle = g
    }

    deinit { _ = acorn_generator_free(handle) }

    /// Generates after `prompt`, calling `onToken` with each token's text and id on this thread
    /// (return false to stop). Blocks until done.
    @discardableResult
    public func generate(
        _ prompt: String, options: GenerateOptions = GenerateOptions(),
        onToken: @escaping (String, UInt32) -> Bool = { _, _ in true }
    ) throws -> GenerationStats {
        var (code, layer, drafts, threshold): (Int32, Int, Int, Float) = (0, 0, 0, 0)
        switch options.decoding {
        case .plain: break
        case .speculative(let l, let d): (code, layer, drafts) = (1, l, d)
        case .auto: code = 2
        case .earlyExit(let t): (code, threshold) = (3, t)
        }
        var opts = try AcornGenerateOptions(
            max_tokens: count(options.maxTokens, "maxTokens"), temperature: options.temperature,
            top_k: count(options.topK, "topK"), top_p: options.topP, seed: options.seed,
            decoding: code, exit_layer: count(layer, "exitLayer"), draft_tokens: count(drafts, "draftTokens"),
            exit_threshold: threshold)
        var stats = AcornGenerateStats()
        let sink = TokenSink(onToken)
        let user = Unmanaged.passUnretained(sink).toOpaque()
        let status = withExtendedLifetime(sink) {
            acorn_generate(
                handle, prompt, &opts,
                { user, piece, len, token in
                    let sink = Unmanaged<TokenSink>.fromOpaque(user!).takeUnretainedValue()
                    let text = piece.map {
                        String(decoding: UnsafeRawBufferPointer(start: $0, count: len), as: UTF8.self)
                    } ?? ""
                    return sink.onToken(text, token) ? 0 : 1
                }, user, &stats)
        }
        try check(status)
        return GenerationStats(
            promptTokens: Int(stats.prompt_tokens), generatedTokens: Int(stats.generated_tokens),
            prefillMs: stats.prefill_ms, decodeMs: stats.decode_ms, stopReason: stats.stop_reason,
            acceptedPerDraft: stats.accepted_per_draft, meanLayersPerToken: stats.mean_layers_per_token)
    }

    /// The generated text piece by piece, produced on a thread of its own; ending the
    /// iteration early (or cancelling the task) cancels the generation.
    public func stream(_ prompt: String, options: GenerateOptions = GenerateOptions()) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let thread = Thread { [self] in
                do {
                    try self.generate(prompt, options: options) { piece, _ in
                        if case .terminated = continuation.yield(piece) { return false }
                        return true
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { [weak self] _ in self?.cancel() }
            thread.start()
        }
    }

    /// Stops a running generation after its current token (from any thread).
    public func cancel() { _ = acorn_generator_cancel(handle) }

    /// Empties the context: the next prompt starts a new conversation.
    public func reset() throws { try check(acorn_generator_reset(handle)) }
}

// MARK: - Classification and on-device learning

/// One utterance's class: its label, the label's probability, and the 1-based encoder layer whose
/// head answered (`layers` when the whole encoder ran).
public struct Prediction: Equatable {
    public let label: String
    public let score: Float
    public let exitLayer: Int
    public let layers: Int
}

/// An intent classifier: a model `acorn convert --train` wrote (encoder, head, exits, tokenizer).
public final class Classifier {
    let handle: AcornClassifier
    private let lock = NSLock()
    /// The labels, in the head's order.
    public let labels: [String]

    public init(model: Model, threads: Int = 1) throws {
        var c = AcornClassifier()
        try check(acorn_classifier_new(model.handle, count(threads, "threads"), &c))
        handle = c
        var n = 0
        try check(acorn_classifier_label_count(c, &n))
        labels = try (0..<n).map { i in
            var p: UnsafePointer<CChar>? = nil
            try check(acorn_classifier_label(c, i, &p))
            return String(cString: p!)
        }
    }

    deinit { _ = acorn_classifier_free(handle) }

    /// Whether runs may stop at an exit head (true by default).
    public func setExits(_ on: Bool) throws { try check(acorn_classifier_set_exits(handle, on ? 1 : 0)) }

    /// Replaces the exits' confidence thresholds (one per exit, each in (0, 1]).
    public func setThresholds(_ t: [Float]) throws {
        try t.withUnsafeBufferPointer { try check(acorn_classifier_set_thresholds(handle, $0.baseAddress, t.count)) }
    }

    /// Classifies utterances as one batch.
    public func classify(_ texts: [String]) throws -> [Prediction] {
        lock.lock()
        defer { lock.unlock() }
        let cStrings = texts.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        var out = [AcornPrediction](repeating: AcornPrediction(), count: texts.count)
        let ptrs: [UnsafePointer<CChar>?] = cStrings.map { UnsafePointer($0) }
        try check(acorn_classify(handle, ptrs, texts.count, &out))
        return out.map {
            Prediction(label: labels[Int($0.label)], score: $0.score, exitLayer: Int($0.exit_layer), layers: Int($0.layers))
        }
    }
}

/// Sentence embeddings of text from an encoder with its tokenizer.
public final class Embedder {
    let handle: AcornEmbedder

    public init(model: Model, threads: Int = 1) throws {
        var e = AcornEmbedder()
        try check(acorn_embedder_new(model.handle, count(threads, "threads"), &e))
        handle = e
    }

    deinit { _ = acorn_embedder_free(handle) }

    public func embed(_ text: String) throws -> [Float] {
        var dim = 0
        try check(acorn_embed(handle, text, nil, 0, &dim))
        var v = [Float](repeating: 0, count: dim)
        try check(acorn_embed(handle, text, &v, dim, &dim))
        return v
    }
}

/// How `HeadTrainer.fit` fits a head.
public enum HeadKind: Int32 {
    case prototype = 1, softmax = 2
}

/// Labelled embeddings collected on the device: teaches an encoder new intents, no converter.
public final class HeadTrainer {
    let handle: AcornTrainer

    public init() throws {
        var t = AcornTrainer()
        try check(acorn_trainer_new(&t))
        handle = t
    }

    deinit { _ = acorn_trainer_free(handle) }

    public func add(_ label: String, _ embedding: [Float]) throws {
        try check(acorn_trainer_add(handle, label, embedding, embedding.count))
    }

    public func fit(_ kind: HeadKind = .prototype) throws -> Head {
        var h = AcornHead()
        try check(acorn_trainer_fit(handle, kind.rawValue, &h))
        return try Head(handle: h)
    }
}

/// A classification head over an encoder's embeddings.
public final class Head {
    let handle: AcornHead
    public let labels: [String]

    init(handle: AcornHead) throws {
        self.handle = handle
        var n = 0
        try check(acorn_head_label_count(handle, &n))
        labels = try (0..<n).map { i in
            var p: UnsafePointer<CChar>? = nil
            try check(acorn_head_label(handle, i, &p))
            return String(cString: p!)
        }
    }

    deinit { _ = acorn_head_free(handle) }

    /// The label of `embedding` (nil below `unknownThreshold`, in (0, 1]) and its probability.
    public func predict(_ embedding: [Float], unknownThreshold: Float = 1e-9) throws -> (label: String?, score: Float) {
        var l: Int32 = 0
        var score: Float = 0
        try check(acorn_head_predict(handle, embedding, embedding.count, unknownThreshold, &l, &score))
        return (l < 0 ? nil : labels[Int(l)], score)
    }

    /// Saves the head for `model`'s encoder; `load` refuses it for any other encoder.
    public func save(path: String, model: Model) throws { try check(acorn_head_save(handle, model.handle, path)) }

    public static func load(path: String, model: Model) throws -> Head {
        var h = AcornHead()
        try check(acorn_head_load(model.handle, path, &h))
        return try Head(handle: h)
    }
}
