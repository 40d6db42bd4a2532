#!/usr/bin/env python3
"""Export a Llama-architecture GGUF (e.g. SmolLM2-135M-Instruct) to a standard fp32 ONNX decoder
with KV cache, in the signature of Hugging Face Optimum's decoder exports, plus its tokenizer.

    python3 export_llama.py MODEL.gguf OUT_DIR [--verify]

Writes OUT_DIR/model.onnx (one file with its weights, as Optimum exports models under 2 GB),
tokenizer.json and config.json. Needs numpy, onnx and gguf (no torch).

Graph (opset 17), dynamic batch, sequence and past lengths:
  inputs  input_ids int64 [B, S], attention_mask int64 [B, P+S], position_ids int64 [B, S],
          past_key_values.N.key / .value f32 [B, kv_heads, P, head_dim]
  outputs logits f32 [B, S, vocab], present.N.key / .value f32 [B, kv_heads, P+S, head_dim]
Built from plain ops the way exporters write a Llama: RMSNorm as Pow/ReduceMean/Add/Sqrt/
Reciprocal/Mul, rotary embeddings as rotate-half with cos/sin tables gathered by position_ids,
grouped-query attention by repeating K/V heads (Unsqueeze/Expand/Reshape), a causal + padding mask
from attention_mask, SwiGLU as x·Sigmoid(x)·up, LM head tied to the embedding (MatMul against its
Transpose, so the weights are stored once).

--verify checks the export against an independent numpy forward pass that uses the GGUF's own
layout (llama.cpp's row-permuted Q/K weights with interleaved-pair rotary): prefill of a prompt
then decode steps with the KV cache, through ONNX Runtime (if importable), and prints the greedy
continuation of "The capital of France is" from the numpy model.
"""
import argparse
import json
import os
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from gguf import GGUFReader
from gguf.quants import dequantize


def load_gguf(path):
    r = GGUFReader(path)
    f = r.fields

    def val(k):
        return f[k].contents()

    cfg = {
        "n_layer": int(val("llama.block_count")),
        "d_model": int(val("llama.embedding_length")),
        "d_ff": int(val("llama.feed_forward_length")),
        "n_head": int(val("llama.attention.head_count")),
        "n_kv_head": int(val("llama.attention.head_count_kv")),
        "eps": float(val("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(val("llama.rope.freq_base")),
        "context_length": int(val("llama.context_length")),
    }
    cfg["head_dim"] = cfg["d_model"] // cfg["n_head"]
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        w[t.name] = a.reshape(shape)
    cfg["vocab"] = w["token_embd.weight"].shape[0]
    tok = {
        "tokens": list(val("tokenizer.ggml.tokens")),
        "types": [int(x) for x in val("tokenizer.ggml.token_type")],
        "merges": list(val("tokenizer.ggml.merges")),
        "bos": int(val("tokenizer.ggml.bos_token_id")),
        "eos": int(val("tokenizer.ggml.eos_token_id")),
        "pre": str(val("tokenizer.ggml.pre")),
        "chat_template": str(val("tokenizer.chat_template")) if "tokenizer.chat_template" in f else None,
    }
    return cfg, w, tok


def unpermute(w, n_head):
    """Inverse of llama.cpp's Q/K row permutation (HF rotate-half layout ← interleaved pairs)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


# ----------------------------------------------------------------------------- tokenizer.json

def tokenizer_json(tok):
    if tok["pre"] not in ("smollm", "gpt2", "default"):
        sys.exit(f"unsupported pre-tokenizer {tok['pre']!r}")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tok["tokens"], tok["types"])) if ty == 3
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level
    if tok["pre"] == "smollm":  # digits split one by one, then GPT-2's regex
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": tok["merges"],
        },
    }


# ----------------------------------------------------------------------------- ONNX graph

class G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr, name=None):
        name = name or self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, ty, inputs, n_out=1, name=None, outputs=None, **attrs):
        name = name or self.name(ty)
        outs = outputs or [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(ty, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs


def build_onnx(cfg, w):
    g = G()
    L, d, H, KV, hd = cfg["n_layer"], cfg["d_model"], cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]
    rep = H // KV
    f32 = lambda x: np.asarray(x, dtype=np.float32)
    i64 = lambda x: np.asarray(x, dtype=np.int64)
    embed = g.const(w["token_embd.weight"], "model.embed_tokens.weight")
    eps = g.const(f32(cfg["eps"]), "rms_eps")
    two = g.const(f32(2.0), "two")

    def rmsnorm(x, weight, prefix):
        sq = g.op("Pow", [x, two], name=f"{prefix}/Pow")
        ms = g.op("ReduceMean", [sq], name=f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
        v = g.op("Add", [ms, eps], name=f"{prefix}/Add")
        s = g.op("Sqrt", [v], name=f"{prefix}/Sqrt")
        r = g.op("Reciprocal", [s], name=f"{prefix}/Reciprocal")
        y = g.op("Mul", [x, r], name=f"{prefix}/Mul")
        return g.op("Mul", [g.const(weight, f"{prefix}.weight"), y], name=f"{prefix}/Mul_1")

    # Rotary tables (HF layout: the frequencies repeated over both halves).
    max_pos = cfg["context_length"]
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(np.arange(max_pos, dtype=np.float64), inv)
    ang = np.concatenate([ang, ang], axis=1)
    cos_t = g.const(f32(np.cos(ang)), "model.rotary_emb.cos_cached")
    sin_t = g.const(f32(np.sin(ang)), "model.rotary_emb.sin_cached")
    cos = g.op("Unsqueeze", [g.op("Gather", [cos_t, "position_ids"], name="rotary/Gather_cos", axis=0),
                             g.const(i64([1]))], name="rotary/Unsqueeze_cos")
    sin = g.op("Unsqueeze", [g.op("Gather", [sin_t, "position_ids"], name="rotary/Gather_sin", axis=0),
                             g.const(i64([1]))], name="rotary/Unsqueeze_sin")
    half_a, half_b = g.const(i64([0])), g.const(i64([hd // 2]))
    end, axis_last = g.const(i64([hd])), g.const(i64([-1]))

    def rope(x, prefix):
        x1 = g.op("Slice", [x, half_a, half_b, axis_last], name=f"{prefix}/Slice")
        x2 = g.op("Slice", [x, half_b, end, axis_last], name=f"{prefix}/Slice_1")
        rot = g.op("Concat", [g.op("Neg", [x2], name=f"{prefix}/Neg"), x1], name=f"{prefix}/Concat", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], name=f"{prefix}/Mul"),
                            g.op("Mul", [rot, sin], name=f"{prefix}/Mul_1")], name=f"{prefix}/Add")

    # Causal + padding mask [B, 1, S, P+S]: 0 where a query may attend, the f32 minimum elsewhere.
    seq = g.op("Gather", [g.op("Shape", ["input_ids"], name="mask/Shape_ids"), g.const(i64(1))],
               name="mask/Gather_seq", axis=0)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], name="mask/Shape_mask"), g.const(i64(1))],
                 name="mask/Gather_total", axis=0)
    past = g.op("Sub", [total, seq], name="mask/Sub_past")
    one = g.const(i64(1))
    qpos = g.op("Range", [past, total, one], name="mask/Range_q")
    kpos = g.op("Range", [g.const(i64(0)), total, one], name="mask/Range_k")
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kpos, g.const(i64([0]))], name="mask/Unsqueeze_k"),
                                  g.op("Unsqueeze", [qpos, g.const(i64([1]))], name="mask/Unsqueeze_q")],
                  name="mask/LessOrEqual")
    pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], name="mask/Cast", to=TensorProto.BOOL),
                             g.const(i64([1, 2]))], name="mask/Unsqueeze_pad")
    allowed = g.op("And", [causal, pad], name="mask/And")
    mask = g.op("Where", [allowed, g.const(f32(0.0)), g.const(f32(np.finfo(np.float32).min))], name="mask/Where")

    h = g.op("Gather", [embed, "input_ids"], name="model/embed_tokens/Gather", axis=0)
    split_q = g.const(i64([0, 0, H, hd]), "shape_q")
    split_kv = g.const(i64([0, 0, KV, hd]), "shape_kv")
    merge = g.const(i64([0, 0, d]), "shape_merge")
    rep_shape = g.const(i64([1, 1, rep, 1, 1]), "expand_rep")
    unrep = g.const(i64([0, H, -1, hd]), "shape_rep")
    ax2 = g.const(i64([2]))
    scale = g.const(f32(1.0 / np.sqrt(hd)), "attn_scale")
    outputs = []
    for i in range(L):
        p = f"model/layers.{i}"
        wq = unpermute(w[f"blk.{i}.attn_q.weight"], H)
        wk = unpermute(w[f"blk.{i}.attn_k.weight"], KV)
        x = rmsnorm(h, w[f"blk.{i}.attn_norm.weight"], f"{p}/input_layernorm")

        def proj(x, weight, name):
            return g.op("MatMul", [x, g.const(weight.T.copy(), f"{p}/{name}.weight")], name=f"{p}/{name}/MatMul")

        q = g.op("Transpose", [g.op("Reshape", [proj(x, wq, "self_attn/q_proj"), split_q], name=f"{p}/q/Reshape")],
                 name=f"{p}/q/Transpose", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [proj(x, wk, "self_attn/k_proj"), split_kv], name=f"{p}/k/Reshape")],
                 name=f"{p}/k/Transpose", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [proj(x, w[f"blk.{i}.attn_v.weight"], "self_attn/v_proj"), split_kv],
                                    name=f"{p}/v/Reshape")], name=f"{p}/v/Transpose", perm=[0, 2, 1, 3])
        q = rope(q, f"{p}/rotary_q")
        k = rope(k, f"{p}/rotary_k")
        pk = g.op("Concat", [f"past_key_values.{i}.key", k], name=f"{p}/Concat_key", outputs=[f"present.{i}.key"],
                  axis=2)
        pv = g.op("Concat", [f"past_key_values.{i}.value", v], name=f"{p}/Concat_value",
                  outputs=[f"present.{i}.value"], axis=2)
        outputs += [pk, pv]

        def repeat(t, name):
            e = g.op("Expand", [g.op("Unsqueeze", [t, ax2], name=f"{p}/{name}/Unsqueeze"), rep_shape],
                     name=f"{p}/{name}/Expand")
            return g.op("Reshape", [e, unrep], name=f"{p}/{name}/Reshape")

        kr, vr = repeat(pk, "repeat_k"), repeat(pv, "repeat_v")
        s = g.op("MatMul", [q, g.op("Transpose", [kr], name=f"{p}/attn/Transpose_k", perm=[0, 1, 3, 2])],
                 name=f"{p}/attn/MatMul_qk")
        s = g.op("Add", [g.op("Mul", [s, scale], name=f"{p}/attn/Mul_scale"), mask], name=f"{p}/attn/Add_mask")
        a = g.op("MatMul", [g.op("Softmax", [s], name=f"{p}/attn/Softmax", axis=-1), vr], name=f"{p}/attn/MatMul_v")
        a = g.op("Reshape", [g.op("Transpose", [a], name=f"{p}/attn/Transpose_out", perm=[0, 2, 1, 3]), merge],
                 name=f"{p}/attn/Reshape_out")
        h = g.op("Add", [h, proj(a, w[f"blk.{i}.attn_output.weight"], "self_attn/o_proj")], name=f"{p}/Add_attn")
        x = rmsnorm(h, w[f"blk.{i}.ffn_norm.weight"], f"{p}/post_attention_layernorm")
        gate = proj(x, w[f"blk.{i}.ffn_gate.weight"], "mlp/gate_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/Mul_silu")
        up = proj(x, w[f"blk.{i}.ffn_up.weight"], "mlp/up_proj")
        m = g.op("Mul", [act, up], name=f"{p}/mlp/Mul")
        h = g.op("Add", [h, proj(m, w[f"blk.{i}.ffn_down.weight"], "mlp/down_proj")], name=f"{p}/Add_mlp")
    h = rmsnorm(h, w["output_norm.weight"], "model/norm")
    lm = g.op("Transpose", [embed], name="lm_head/Transpose", perm=[1, 0])
    g.op("MatMul", [h, lm], name="lm_head/MatMul", outputs=["logits"])

    B, S, P, T = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, T]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S]),
    ]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, S, cfg["vocab"]])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, [B, KV, P, hd]))
            outs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [B, KV, T, hd]))
    graph = helper.make_graph(g.nodes, "llama", inputs, outs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="acorn-export-llama")
    model.ir_version = 8
    return model


# ----------------------------------------------------------------------------- numpy reference

def rms(x, wt, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * wt


def np_forward(cfg, w, ids, cache):
    """One forward step of the GGUF model in llama.cpp's layout: permuted Q/K, interleaved-pair
    rotary. `cache` is a list of (K, V) per layer, [kv_heads, P, hd]; updated in place."""
    H, KV, hd = cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]
    past = cache[0][0].shape[1] if cache[0] is not None else 0
    S = len(ids)
    pos = np.arange(past, past + S)
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(pos, inv)
    c, s = np.cos(ang), np.sin(ang)

    def rope(x):  # x [heads, S, hd], pairs (2j, 2j+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    h = w["token_embd.weight"][ids].astype(np.float64)
    for i in range(cfg["n_layer"]):
        x = rms(h, w[f"blk.{i}.attn_norm.weight"], cfg["eps"])
        q = (x @ w[f"blk.{i}.attn_q.weight"].T).reshape(S, H, hd).transpose(1, 0, 2)
        k = (x @ w[f"blk.{i}.attn_k.weight"].T).reshape(S, KV, hd).transpose(1, 0, 2)
        v = (x @ w[f"blk.{i}.attn_v.weight"].T).reshape(S, KV, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        if cache[i] is not None:
            k = np.concatenate([cache[i][0], k], axis=1)
            v = np.concatenate([cache[i][1], v], axis=1)
        cache[i] = (k, v)
        T = k.shape[1]
        out = np.empty((H, S, hd))
        allowed = np.arange(T)[None, :] <= (past + np.arange(S))[:, None]
        for hh in range(H):
            sc = q[hh] @ k[hh // (H // KV)].T / np.sqrt(hd)
            sc = np.where(allowed, sc, -np.inf)
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            out[hh] = sc @ v[hh // (H // KV)]
        h = h + out.transpose(1, 0, 2).reshape(S, -1) @ w[f"blk.{i}.attn_output.weight"].T
        x = rms(h, w[f"blk.{i}.ffn_norm.weight"], cfg["eps"])
        gt = x @ w[f"blk.{i}.ffn_gate.weight"].T
        h = h + ((gt / (1 + np.exp(-gt))) * (x @ w[f"blk.{i}.ffn_up.weight"].T)) @ w[f"blk.{i}.ffn_down.weight"].T
    h = rms(h, w["output_norm.weight"], cfg["eps"])
    return h @ w["token_embd.weight"].T


def verify(cfg, w, out_dir, tok_path):
    prompt = "The capital of France is"
    try:
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(tok_path)).encode(prompt).ids
    except ImportError:  # the tokens of the prompt (SmolLM2's BPE), for machines without `tokenizers`
        ids = [504, 3575, 282, 4649, 314]
    cache = [None] * cfg["n_layer"]
    ref = [np_forward(cfg, w, ids, cache)]
    gen = []
    for _ in range(8):
        nxt = int(ref[-1][-1].argmax())
        gen.append(nxt)
        ref.append(np_forward(cfg, w, [nxt], cache))
    toks = cfg.get("_tokens")
    text = "".join(toks[t] for t in gen).replace("Ġ", " ").replace("Ċ", "\n") if toks else str(gen)
    print(f"[export] numpy reference greedy continuation of {prompt!r}: {text!r} {gen}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("[export] onnxruntime not importable: the ONNX graph was not run here")
        return
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    L, KV, hd = cfg["n_layer"], cfg["n_kv_head"], cfg["head_dim"]
    feeds = {f"past_key_values.{i}.{k}": np.zeros((1, KV, 0, hd), np.float32) for i in range(L) for k in ("key", "value")}
    steps = [ids] + [[t] for t in gen]
    past, worst = 0, 0.0
    names = [o.name for o in sess.get_outputs()]
    for step, r in zip(steps, ref):
        n = len(step)
        feeds["input_ids"] = np.array([step], np.int64)
        feeds["position_ids"] = np.arange(past, past + n, dtype=np.int64)[None]
        feeds["attention_mask"] = np.ones((1, past + n), np.int64)
        outs = dict(zip(names, sess.run(None, feeds)))
        for i in range(L):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = outs[f"present.{i}.{k}"]
        past += n
        d = float(np.abs(outs["logits"][0] - r).max())
        worst = max(worst, d)
        if outs["logits"][0].argmax(-1).tolist() != r.argmax(-1).tolist():
            sys.exit(f"[export] ONNX Runtime and the numpy reference disagree on the top token (max |Δ| {d:.2e})")
    print(f"[export] ONNX Runtime vs numpy reference over {len(steps)} steps (prefill + KV-cache decode): "
          f"max |Δ logits| = {worst:.2e}, top-1 equal")
    if worst > 1e-2:
        sys.exit("[export] the export does not match the reference")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--verify", action="store_true")
    a = ap.parse_args()
    out = pathlib.Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, w, tok = load_gguf(a.gguf)
    cfg["_tokens"] = tok["tokens"]
    tmp = out / ".model.onnx.partial"
    model = build_onnx(cfg, w)
    onnx.save_model(model, str(tmp))
    os.replace(tmp, out / "model.onnx")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False))
    conf = {k: v for k, v in cfg.items() if not k.startswith("_")}
    conf.update({"bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "chat_template": tok["chat_template"]})
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    print(f"[export] wrote {out / 'model.onnx'} ({len(model.graph.node)} nodes), tokenizer.json, config.json")
    if a.verify:
        verify(cfg, w, out, out / "tokenizer.json")


if __name__ == "__main__":
    main()
