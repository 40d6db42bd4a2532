"""all-MiniLM-L6-v2 (the test assets' safetensors) exported three ways, for the exporter-forms
benchmark in docs/BENCHMARKS.md:

    python3 benches/scripts/export_minilm_forms.py MODEL_DIR OUT_DIR   # needs torch, transformers

- OUT_DIR/minilm_ts.onnx: torch.onnx TorchScript (dynamo=False), opset 17;
- OUT_DIR/minilm_dynamo.onnx: torch.onnx dynamo, opset 18, weights inline;
- OUT_DIR/minilm_ort.onnx: minilm_ts after onnxruntime.transformers.optimizer (Optimum's --optimize).
Inputs input_ids, attention_mask ([batch, seq], int64); output last_hidden_state.
"""
import sys
import warnings

import torch
from onnxruntime.transformers import optimizer
from transformers import BertModel

warnings.filterwarnings("ignore")
src, out = sys.argv[1], sys.argv[2]
bert = BertModel.from_pretrained(src, add_pooling_layer=False).eval()
bert.config._attn_implementation = "eager"


class Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


ids = torch.randint(1000, 2000, (1, 16))
mask = torch.ones(1, 16, dtype=torch.long)
names = ["input_ids", "attention_mask"]
axes = {0: "b", 1: "s"}
torch.onnx.export(Hidden(bert).eval(), (ids, mask), f"{out}/minilm_ts.onnx", input_names=names,
                  output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                  dynamic_axes={"input_ids": axes, "attention_mask": axes})
dims = {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=512)}
torch.onnx.export(Hidden(bert).eval(), (ids, mask), f"{out}/minilm_dynamo.onnx", input_names=names,
                  output_names=["last_hidden_state"], opset_version=18, dynamo=True, external_data=False,
                  dynamic_shapes=(dims, dims))
m = optimizer.optimize_model(f"{out}/minilm_ts.onnx", model_type="bert", num_heads=12, hidden_size=384)
m.save_model_to_file(f"{out}/minilm_ort.onnx")
