#!/usr/bin/env python3
"""Runs the ONNX backend node test suite through ONNX Runtime with the same rules as
`acorn conformance` (every test_data_set, dtype + shape exact, values within rtol 1e-3 /
atol 1e-5, NaN == NaN), so the two pass counts can be compared on the same machine.

    python3 benches/scripts/ort_conformance.py .cache/acorn-assets/onnx/onnx/backend/test/data/node

Needs numpy, onnx==1.22.0 and onnxruntime==1.32.0 importable (e.g. in a virtualenv).
"""
import glob
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def load_pb(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def run_case(d):
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(os.path.join(d, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    sets = sorted(glob.glob(os.path.join(d, "test_data_set_*")))
    if not sets:
        raise RuntimeError("no data sets")
    for s in sets:
        ins = [load_pb(p) for p in sorted(glob.glob(os.path.join(s, "input_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))]
        want = [load_pb(p) for p in sorted(glob.glob(os.path.join(s, "output_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))]
        got = sess.run(outs, dict(zip(names, ins)))
        for g, w in zip(got, want):
            g = np.asarray(g)
            if g.dtype != w.dtype or g.shape != w.shape:
                raise AssertionError(f"dtype/shape {g.dtype}{g.shape} vs {w.dtype}{w.shape}")
            if w.dtype.kind == "f":
                if not np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-3, atol=1e-5, equal_nan=True):
                    raise AssertionError("values differ")
            elif not np.array_equal(g, w):
                raise AssertionError("values differ")


def main():
    root = sys.argv[1]
    tests = sorted(d for d in glob.glob(os.path.join(root, "test_*")) if os.path.isfile(os.path.join(d, "model.onnx")))
    passed = 0
    for d in tests:
        try:
            run_case(d)
            passed += 1
        except Exception:
            pass
    print(f"onnxruntime {ort.__version__}: {passed} of {len(tests)} node tests pass")


if __name__ == "__main__":
    main()
