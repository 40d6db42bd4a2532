#!/usr/bin/env python3
"""ONNX Runtime's own weight-only 4-bit model: `MatMulNBitsQuantizer` rewrites every MatMul with
a constant weight as `com.microsoft:MatMulNBits` (blocks along K with a scale each and, unless
--symmetric, a 4-bit zero point). Used by the tests of `acorn convert`'s import of such models.
Run with the pinned packages the assets script installs:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 ort_quantize_nbits.py IN.onnx OUT.onnx [--block 32] [--symmetric]
"""
import argparse
import logging
import os

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("--block", type=int, default=32)
ap.add_argument("--symmetric", action="store_true")
args = ap.parse_args()
logging.disable(logging.INFO)
q = MatMulNBitsQuantizer(onnx.load(args.src), bits=4, block_size=args.block, is_symmetric=args.symmetric)
q.process()
tmp = args.dst + ".tmp.onnx"
q.model.save_model_to_file(tmp, use_external_data_format=False)
os.replace(tmp, args.dst)
print(args.dst)
