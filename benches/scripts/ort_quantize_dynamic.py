#!/usr/bin/env python3
"""ONNX Runtime's own int8 model for the quantized rows of `model-bench --quantized`:
`onnxruntime.quantization.quantize_dynamic` with int8 weights (its documented default for
transformers on CPU). Run with the pinned packages the assets script installs:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 ort_quantize_dynamic.py IN.onnx OUT.onnx
"""
import fcntl
import os
import sys

from onnxruntime.quantization import QuantType, quantize_dynamic

src, dst = sys.argv[1], sys.argv[2]
tmp = dst + ".tmp.onnx"
# quantize_dynamic writes its shape-inferred copy beside the input (`*-inferred.onnx`) and deletes
# it: two runs on one model at once (the tests run in parallel) took each other's file. One at a
# time per input.
with open(src + ".quantize.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    quantize_dynamic(src, tmp, weight_type=QuantType.QInt8)
os.replace(tmp, dst)
print(dst)
