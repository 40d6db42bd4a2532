#!/usr/bin/env python3
"""PP-OCRv4's text detector statically quantized the way ONNX Runtime's documentation says to:
`quant_pre_process` (shape inference, BatchNorm folded, `Constant` nodes to initializers), opset
13 (per-channel `DequantizeLinear` needs it; `quantize_static` on the opset-12 export writes an
`axis` ONNX Runtime itself refuses), then `quantize_static` in the QDQ format (per-channel int8
weights, int8 activations) calibrated on scikit-image's sample photos other than `page.png`,
which is held out: its 768×384 detector input (PaddleOCR's preprocessing, as `tests/src/ocr.rs`)
is written next to the model as `OUT.page.npy`. Run with the pinned packages:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 benches/scripts/ort_quantize_static_ocr.py \\
        .cache/acorn-assets/rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx \\
        det-qdq.onnx .cache/acorn-assets/skimage-data/skimage/data
"""
import os
import struct
import sys
import tempfile
import zlib

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


def png_gray(path):
    """An 8-bit non-interlaced PNG as float gray values (RGB averaged)."""
    data = open(path, "rb").read()
    pos, idat, w, h, ct = 8, b"", 0, 0, 0
    while pos < len(data):
        n, t = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if t == b"IHDR":
            w, h, depth, ct, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or interlace != 0:
                raise ValueError(f"{path}: {depth}-bit or interlaced PNG")
        elif t == b"IDAT":
            idat += body
        pos += 12 + n
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[ct]
    raw, stride = zlib.decompress(idat), w * ch
    out = np.zeros((h, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    i = 0
    for y in range(h):
        f, line = raw[i], np.frombuffer(raw[i + 1:i + 1 + stride], np.uint8).astype(np.int32)
        i += 1 + stride
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                a = cur[x - ch] if x >= ch else 0
                b, c = prev[x], (prev[x - ch] if x >= ch else 0)
                if f == 1:
                    p = a
                elif f == 3:
                    p = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + p) & 255
        out[y], prev = cur, cur
    img = out.reshape(h, w, ch).astype(np.float32)
    return img[..., :3].mean(axis=2) if ch >= 3 else img[..., 0]


def det_input(gray, h=384, w=768):
    """Bilinear resize (pixel centres aligned), `(v/255 − 0.5)/0.5`, gray in R, G and B."""
    ys = np.clip((np.arange(h) + 0.5) * gray.shape[0] / h - 0.5, 0, gray.shape[0] - 1)
    xs = np.clip((np.arange(w) + 0.5) * gray.shape[1] / w - 0.5, 0, gray.shape[1] - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, gray.shape[0] - 1), np.minimum(x0 + 1, gray.shape[1] - 1)
    ty, tx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = gray
    v = (g[y0][:, x0] * (1 - tx) + g[y0][:, x1] * tx) * (1 - ty) + (g[y1][:, x0] * (1 - tx) + g[y1][:, x1] * tx) * ty
    p = (v / 255.0 - 0.5) / 0.5
    return np.stack([p, p, p])[None].astype(np.float32)


src, dst, data_dir = sys.argv[1:4]
calib = ["text.png", "camera.png", "coins.png", "brick.png", "moon.png", "clock_motion.png", "chessboard_GRAY.png",
         "coffee.png"]
items = [{"x": det_input(png_gray(os.path.join(data_dir, n)))} for n in calib]


class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(items)

    def get_next(self):
        return next(self.it, None)


with tempfile.TemporaryDirectory() as tmp:
    pre, up = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "pre13.onnx")
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    onnx.save(version_converter.convert_version(onnx.load(pre), 13), up)
    quantize_static(up, dst + ".tmp.onnx", Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    os.replace(dst + ".tmp.onnx", dst)
    onnx.save(onnx.load(up), dst + ".fp32.onnx")
np.save(dst + ".page.npy", det_input(png_gray(os.path.join(data_dir, "page.png"))))
print(dst)
