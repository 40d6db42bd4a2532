#!/usr/bin/env bash
# Builds ios/CAcorn.xcframework: the C library (libacorn_ffi.a, device profile) for iOS devices
# (aarch64-apple-ios), the simulator (aarch64-apple-ios-sim + x86_64-apple-ios, one fat library)
# and macOS (arm64 + x86_64, for `swift test` on the Mac), with include/acorn.h and the module map that lets Swift `import CAcorn`.
#
# Needs macOS with Xcode (xcodebuild, lipo) and the rustup targets:
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin
# FEATURES="full" builds without text generation (tensors only, a smaller library); the runtime's
# op-family and kernel-set features (runtime/ffi/Cargo.toml) leave out more.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=${FEATURES-text full}
OUT=ios/CAcorn.xcframework
build() {
  cargo rustc --profile device -p acorn-ffi --target "$1" --no-default-features ${FEATURES:+--features "$FEATURES"} \
    --crate-type staticlib
}
for t in aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin; do build "$t"; done
HEADERS=$(mktemp -d)
trap 'rm -rf "$HEADERS"' EXIT
cp runtime/ffi/include/acorn.h ios/module.modulemap "$HEADERS/"
mkdir -p target/ios-sim target/macos
lipo -create target/aarch64-apple-ios-sim/device/libacorn_ffi.a target/x86_64-apple-ios/device/libacorn_ffi.a \
  -output target/ios-sim/libacorn_ffi.a
lipo -create target/aarch64-apple-darwin/device/libacorn_ffi.a target/x86_64-apple-darwin/device/libacorn_ffi.a \
  -output target/macos/libacorn_ffi.a
rm -rf "$OUT"
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/device/libacorn_ffi.a -headers "$HEADERS" \
  -library target/ios-sim/libacorn_ffi.a -headers "$HEADERS" \
  -library target/macos/libacorn_ffi.a -headers "$HEADERS" \
  -output "$OUT"
echo "wrote $OUT"
