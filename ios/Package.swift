// swift-tools-version:5.9
// Acorn's Swift API over the C ABI (runtime/ffi). `ios/build-xcframework.sh` builds
// CAcorn.xcframework (libacorn_ffi.a for iOS devices and the simulator, with acorn.h and its
// module map) next to this file; then add this folder as a package dependency in Xcode.
import PackageDescription

let package = Package(
    name: "Acorn",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Acorn", targets: ["Acorn"]),
    ],
    targets: [
        .binaryTarget(name: "CAcorn", path: "CAcorn.xcframework"),
        .target(name: "Acorn", dependencies: ["CAcorn"], path: "Sources/Acorn"),
        .testTarget(name: "AcornTests", dependencies: ["Acorn"], path: "Tests/AcornTests"),
    ]
)
