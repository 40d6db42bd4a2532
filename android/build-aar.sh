#!/usr/bin/env bash
# Builds the Android library: target/android/acorn-<version>.aar with the Kotlin classes and
# libacorn_jni.so for each ABI, linked for 16 KB pages.
#
#   android/build-aar.sh                      # arm64-v8a (the default ABIS)
#   ABIS="arm64-v8a armeabi-v7a x86_64" android/build-aar.sh
#
# Needs the Android NDK (ANDROID_NDK_HOME), cargo-ndk (`cargo install cargo-ndk`), the rustup
# targets (`rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android`)
# and Maven. To package libraries built some other way, name them instead of building:
#   JNI_LIB_arm64_v8a=path/to/libacorn_jni.so android/build-aar.sh
# (.ci/run does so with the aarch64 GNU/Linux build standing in, to check the AAR's layout and
# the page alignment; that AAR is not for shipping, its library being linked against glibc).
#
# The AAR holds:
#   AndroidManifest.xml          the library's package (dev.acorn), minSdk 24
#   classes.jar                  dev.acorn.* (needs org.jetbrains.kotlin:kotlin-stdlib-jdk7 at run time)
#   jni/<abi>/libacorn_jni.so    what an app's APK carries as lib/<abi>/ (an app building from
#                                source puts it in src/main/jniLibs/<abi>/ instead)
#   proguard.txt                 keep rules for what the JNI layer finds by name (R8 would rename it)
#   R.txt                        empty: no resources
set -euo pipefail
cd "$(dirname "$0")/.."
ABIS=${ABIS:-arm64-v8a}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
OUT=${OUT:-target/android/acorn-$VERSION.aar}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

# 16 KB pages: Android 15 devices may use them, and Google Play requires 16 KB-aligned native
# libraries for apps targeting Android 15+. The NDK r28+ links so by default; older NDKs need
# the flag (harmless on 4 KB devices). `.cargo/config.toml` sets the same for `cargo build
# --target aarch64-linux-android`.
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-z,max-page-size=16384"

for abi in $ABIS; do
  var="JNI_LIB_${abi//-/_}"
  mkdir -p "$STAGE/jni/$abi"
  if [ -n "${!var:-}" ]; then
    cp "${!var}" "$STAGE/jni/$abi/libacorn_jni.so"
  else
    # The device profile: fat LTO, one codegen unit, stripped, panics still caught at the boundary.
    cargo ndk --target "$abi" --platform 24 --output-dir "$STAGE/ndk" build --profile device -p acorn-jni
    cp "$STAGE/ndk/$abi/libacorn_jni.so" "$STAGE/jni/$abi/"
  fi
  # Every loadable segment aligned to 16 KB (0x4000) or more.
  aligns=$(readelf -lW "$STAGE/jni/$abi/libacorn_jni.so" | awk '$1 == "LOAD" { print $NF }')
  for a in $aligns; do
    if (( a < 0x4000 )); then
      echo "error: $abi/libacorn_jni.so has a LOAD segment aligned to $a, not 16 KB" >&2
      exit 1
    fi
  done
  echo "$abi: libacorn_jni.so $(stat -c %s "$STAGE/jni/$abi/libacorn_jni.so") bytes, LOAD alignment $(echo $aligns | tr ' ' ',')"
done

mvn -q -B -f android/pom.xml ${MAVEN_ARGS:-} -DskipTests package
cp "android/target/acorn-$VERSION.jar" "$STAGE/classes.jar"
cat > "$STAGE/AndroidManifest.xml" <<XML
<?xml version="1.0" encoding="utf-8"?>
<manifest xmlns:android="http://schemas.android.com/apk/res/android" package="dev.acorn">
    <uses-sdk android:minSdkVersion="24" />
</manifest>
XML
cat > "$STAGE/proguard.txt" <<'RULES'
# Acorn's JNI layer calls these by name.
-keepclasseswithmembernames class dev.acorn.Native { native <methods>; }
-keep class dev.acorn.AcornException { <init>(int, java.lang.String); }
-keep interface dev.acorn.TokenListener { *; }
RULES
: > "$STAGE/R.txt"
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
OUT_ABS="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
(cd "$STAGE" && python3 -m zipfile -c "$OUT_ABS" AndroidManifest.xml classes.jar jni proguard.txt R.txt)
echo "wrote $OUT"
