#!/usr/bin/env python3
"""ONNX Runtime's own QDQ int8 model: `quantize_static` in QDQ format, int8 weights per output
channel (symmetric) and uint8 activations, calibrated (MinMax) on a few token sequences drawn
from a fixed seed. Used by the tests of `acorn convert`'s import of QDQ models. Run with the
pinned packages the assets script installs:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 ort_quantize_qdq.py IN.onnx OUT.onnx
"""
import logging
import os
import sys

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


class Reader(CalibrationDataReader):
    def __init__(self, model):
        names = [i.name for i in model.graph.input]
        rng = np.random.default_rng(0)
        self.samples = []
        for _ in range(8):
            ids = rng.integers(1000, 20000, size=(1, 16), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.zeros_like(ids)
            self.samples.append({k: v for k, v in feed.items() if k in names})
        self.it = iter(self.samples)

    def get_next(self):
        return next(self.it, None)


src, dst = sys.argv[1], sys.argv[2]
logging.disable(logging.WARNING)
tmp = dst + ".tmp.onnx"
quantize_static(src, tmp, Reader(onnx.load(src)), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"])
os.replace(tmp, dst)
print(dst)
