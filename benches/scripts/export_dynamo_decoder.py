"""A SmolLM2-135M-shaped Llama (30 layers, 576 wide, 9 query / 3 KV heads, vocab 49152; random
weights: the figure is speed, not text) exported by torch.onnx's dynamo exporter with its KV cache
as inputs and outputs (the Optimum signature), for the decode-speed comparison of a cache bound in
the runtime against one passed through the graph (docs/BENCHMARKS.md, issue 23).

    /path/to/torch-venv/bin/python benches/scripts/export_dynamo_decoder.py OUT.onnx

Needs torch, transformers and onnxscript (not project dependencies; made with torch 2.15.0,
transformers 5.25.0, onnxscript 0.7.2).
"""
import sys
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

warnings.filterwarnings("ignore")
torch.manual_seed(0)
LAYERS = 30
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=LAYERS,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)
model = LlamaForCausalLM(config).eval()


class WithCache(torch.nn.Module):
    """One decoder step with the KV cache as plain tensors (the Optimum signature)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=config)
        for i in range(LAYERS):
            cache.update(past[2 * i], past[2 * i + 1], i)
        o = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True)
        out = [o.logits]
        for layer in o.past_key_values.layers:
            out += [layer.keys, layer.values]
        return tuple(out)


ids = torch.randint(0, 49152, (1, 3))
past = [torch.randn(1, 3, 4, 64) for _ in range(2 * LAYERS)]
names = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
s, t, p = torch.export.Dim("s", max=512), torch.export.Dim("t", max=2048), torch.export.Dim("p", max=1536)
torch.onnx.export(
    WithCache(model), (ids, torch.ones(1, 7, dtype=torch.long), torch.arange(4, 7)[None], *past), sys.argv[1],
    dynamo=True, opset_version=18, external_data=False,
    input_names=["input_ids", "attention_mask", "position_ids", *names],
    output_names=["logits", *[n.replace("past_key_values", "present") for n in names]],
    dynamic_shapes=({1: s}, {1: t}, {1: s}, tuple({2: p} for _ in names)))
print("wrote", sys.argv[1])
