#!/usr/bin/env python3
"""A model quantized the way ONNX Runtime's static quantization writes it — the QDQ format:
`QuantizeLinear → DequantizeLinear` on every product's activation (scales calibrated on
`CALIB.txt`, one sentence per line), int8 weights per output channel behind `DequantizeLinear`.
For BERT-style encoders with `input_ids` / `attention_mask` inputs (MiniLM). Run with the pinned
packages the assets script installs:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 ort_quantize_static.py IN.onnx OUT.onnx TOKENIZER.json CALIB.txt
"""
import os
import sys

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from tokenizers import Tokenizer

src, dst, tok_path, calib = sys.argv[1:5]
tok = Tokenizer.from_file(tok_path)
lines = [l.strip() for l in open(calib, encoding="utf-8") if l.strip()][:64]


class Reader(CalibrationDataReader):
    def __init__(self):
        self.items = iter(lines)

    def get_next(self):
        line = next(self.items, None)
        if line is None:
            return None
        ids = tok.encode(line).ids[:128]
        return {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        }


tmp = dst + ".tmp.onnx"
quantize_static(
    src,
    tmp,
    Reader(),
    quant_format=QuantFormat.QDQ,
    activation_type=QuantType.QInt8,
    weight_type=QuantType.QInt8,
    per_channel=True,
    op_types_to_quantize=["MatMul"],
)
os.replace(tmp, dst)
print(dst)
