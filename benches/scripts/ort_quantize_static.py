#!/usr/bin/env python3
"""A model quantized the way ONNX Runtime's static quantization writes it — the QDQ format:
`QuantizeLinear → DequantizeLinear` on every product's activation (scales calibrated on
`CALIB.txt`, one sentence per line), int8 weights per output channel behind `DequantizeLinear`.
For BERT-style encoders with `input_ids` / `attention_mask` inputs (MiniLM), or — with `-` for
the tokenizer and a count for the calibration — any model with fixed-shape f32 inputs, calibrated
on that many seeded normal samples (convolutional networks: Conv, MatMul and Gemm quantized).
Run with the pinned packages the assets script installs:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 ort_quantize_static.py IN.onnx OUT.onnx TOKENIZER.json CALIB.txt
    PYTHONPATH=.cache/acorn-assets/pydeps python3 ort_quantize_static.py IN.onnx OUT.onnx - 16
"""
import fcntl
import os
import sys

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from tokenizers import Tokenizer

src, dst, tok_path, calib = sys.argv[1:5]
# quantize_static writes and deletes a shape-inferred copy beside the input, as quantize_dynamic
# does (see ort_quantize_dynamic.py): one run per input at a time, held until the script exits.
lock = open(src + ".quantize.lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)


class Random(CalibrationDataReader):
    def __init__(self, model, count):
        import onnx

        g = onnx.load(model).graph
        init = {t.name for t in g.initializer}
        self.shapes = {
            i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input if i.name not in init
        }
        rng = np.random.default_rng(7)
        self.items = iter(
            [{n: rng.standard_normal(s).astype(np.float32) for n, s in self.shapes.items()} for _ in range(count)]
        )

    def get_next(self):
        return next(self.items, None)


if tok_path == "-":
    tmp = dst + ".tmp.onnx"
    quantize_static(
        src,
        tmp,
        Random(src, int(calib)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )
    os.replace(tmp, dst)
    print(dst)
    sys.exit(0)

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
