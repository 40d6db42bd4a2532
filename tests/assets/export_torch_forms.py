"""Writes tests/data/exporters/: tiny random-weight models exported by torch.onnx itself, so the
fusions are tested on the forms the exporters really emit (not only on graphs Acorn's own builder
writes).

    python3 tests/assets/export_torch_forms.py      # needs torch and transformers (not in CI)

Each model `NAME.onnx` (weights inline) comes with its inputs `NAME.INPUT.npy` and `NAME.ref.npy`, PyTorch's own
output for those inputs (the definition the test compares with). Made with torch 2.15.0,
transformers 5.25.0, onnxscript 0.7.2 (2026-12-05).

- `llama_dynamo`: a 1-layer Llama (GQA 4 query / 2 KV heads, tied head) through
  `torch.onnx.export(dynamo=True)`, opset 18: RMSNorm with `Reciprocal(Sqrt)`, rotary angles
  computed in the graph (`Cos/Sin(Concat(f, f))`), SDPA decomposed (√scale on q and kᵀ, kᵀ as
  reshapes around a 3-D transpose, `Expand` to the value's own dims, `Where(IsNaN(p), 0, p)`).
- `bert_dynamo`: a 1-layer BERT through dynamo, opset 18: `LayerNormalization`, GELU as
  `x · (½ · (1 + erf(x/√2)))`, reshape targets from `Shape(mask, start, end)`, `allowzero = 1`.
- `bert_ts`: the same BERT through TorchScript (`dynamo=False`), opset 14: LayerNorm written out,
  heads split by `[B, S, −1, D]` with B and S gathered from the shape of the projections' input.

- `llama_kv_dynamo`: the same Llama with its KV cache as inputs and outputs (`input_ids`,
  `attention_mask`, `position_ids`, `past_key_values.0.key/value` → `logits`, `present.0.key/value`),
  through dynamo: the cache concatenated on axis −2, the `Expand` of repeated heads to past + new
  length. `llama_kv_dynamo.tokens.npy` holds a prompt and PyTorch's greedy continuation,
  `llama_kv_dynamo.logits.npy` PyTorch's logits at every position from the prompt's last.
- `bert_ort` / `bertd_ort`: `bert_ts` / `bert_dynamo` after ONNX Runtime's transformer optimizer
  (`onnxruntime.transformers.optimizer --model_type bert`, what Optimum's `--optimize` runs):
  `com.microsoft` `EmbedLayerNormalization`, `Attention` (packed QKV, key lengths as its mask),
  `SkipLayerNormalization`, `BiasGelu` (bert_ort); `SkipLayerNormalization`, `BiasGelu` and the
  dynamo attention left as it was (bertd_ort).
- `llama_ort`: `llama_dynamo` after the same optimizer (`--model_type gpt2`):
  `SimplifiedLayerNormalization` (default domain) and `com.microsoft:SkipSimplifiedLayerNormalization`.
  The reference outputs are the source models' (the optimizer changes no weight).

(transformers 5's Llama does not export through TorchScript: `aten::diff` in its mask code.)
"""
import os
import warnings

import shutil

import numpy as np
import onnx
from onnxruntime.transformers import optimizer
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

warnings.filterwarnings("ignore")
OUT = os.path.join(os.path.dirname(__file__), "..", "data", "exporters")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)


class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


class Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def strip(path):
    """Drops the exporters' stack traces and source-line names: not the graph, most of the bytes."""
    m = onnx.load(path)
    for n in m.graph.node:
        n.doc_string = ""
        del n.metadata_props[:]
    for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        del v.metadata_props[:]
    del m.metadata_props[:]
    onnx.save(m, path)


def save(name, model, inputs, names, dynamo, opset, dynamic):
    path = os.path.join(OUT, f"{name}.onnx")
    kw = dict(input_names=names, output_names=["out"], opset_version=opset, dynamo=dynamo)
    if dynamo:
        kw["dynamic_shapes"] = dynamic
        kw["external_data"] = False
    else:
        kw["dynamic_axes"] = dynamic
    torch.onnx.export(model, inputs, path, **kw)
    strip(path)
    with torch.no_grad():
        ref = model(*inputs).numpy().astype(np.float32)
    for n, t in zip(names, inputs):
        np.save(os.path.join(OUT, f"{name}.{n}.npy"), t.numpy())
    np.save(os.path.join(OUT, f"{name}.ref.npy"), ref)
    print(name, os.path.getsize(path), "bytes")


llama_config = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
llama = LlamaForCausalLM(llama_config).eval()
ids = torch.randint(0, 96, (1, 7))
save("llama_dynamo", Logits(llama).eval(), (ids,), ["input_ids"], True, 18,
     ({1: torch.export.Dim("s", max=48)},))

bert = BertModel(BertConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
    max_position_embeddings=48), add_pooling_layer=False).eval()
bert.config._attn_implementation = "eager"
ids = torch.randint(0, 96, (2, 6))
mask = torch.ones(2, 6, dtype=torch.long)
mask[1, 4:] = 0
dims = {0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", max=48)}
save("bert_dynamo", Hidden(bert).eval(), (ids, mask), ["input_ids", "attention_mask"], True, 18, (dims, dims))
axes = {0: "b", 1: "s"}
save("bert_ts", Hidden(bert).eval(), (ids, mask), ["input_ids", "attention_mask"], False, 14,
     {"input_ids": axes, "attention_mask": axes})


class WithCache(torch.nn.Module):
    """The decoder step with a one-layer KV cache as plain tensors (the Optimum signature)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, position_ids, past_key, past_value):
        cache = DynamicCache(config=llama_config)
        cache.update(past_key, past_value, 0)
        o = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True)
        layer = o.past_key_values.layers[0]
        return o.logits, layer.keys, layer.values


path = os.path.join(OUT, "llama_kv_dynamo.onnx")
ids = torch.randint(0, 96, (1, 3))
past = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
torch.onnx.export(
    WithCache(llama).eval(), (ids, torch.ones(1, 7, dtype=torch.long), torch.arange(4, 7)[None], *past), path,
    dynamo=True, opset_version=18, external_data=False,
    input_names=["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"],
    output_names=["logits", "present.0.key", "present.0.value"],
    dynamic_shapes=({1: torch.export.Dim("s", max=32)}, {1: torch.export.Dim("t", max=64)},
                    {1: torch.export.Dim("s", max=32)}, {2: torch.export.Dim("p", max=32)},
                    {2: torch.export.Dim("p", max=32)}))
strip(path)
tokens = [5, 17, 42, 8]
with torch.no_grad():
    while len(tokens) < 12:
        tokens.append(int(llama(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    logits = llama(input_ids=torch.tensor([tokens])).logits[0, 3:].numpy()
np.save(os.path.join(OUT, "llama_kv_dynamo.tokens.npy"), np.array(tokens, dtype=np.int64))
np.save(os.path.join(OUT, "llama_kv_dynamo.logits.npy"), logits.astype(np.float32))
print("llama_kv_dynamo", os.path.getsize(path), "bytes")


def optimized(name, source, model_type):
    """`source` through ONNX Runtime's transformer optimizer, with the source's inputs and outputs."""
    m = optimizer.optimize_model(os.path.join(OUT, f"{source}.onnx"), model_type=model_type, num_heads=4, hidden_size=64)
    m.save_model_to_file(os.path.join(OUT, f"{name}.onnx"))
    for f in os.listdir(OUT):
        if f.startswith(source + ".") and f.endswith(".npy"):
            shutil.copy(os.path.join(OUT, f), os.path.join(OUT, name + f[len(source):]))
    print(name, os.path.getsize(os.path.join(OUT, f"{name}.onnx")), "bytes")


optimized("bert_ort", "bert_ts", "bert")
optimized("bertd_ort", "bert_dynamo", "bert")
optimized("llama_ort", "llama_dynamo", "gpt2")
