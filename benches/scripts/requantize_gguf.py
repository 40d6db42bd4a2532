#!/usr/bin/env python3
"""Requantizes a GGUF with llama.cpp's own quantize API (llama-cpp-python), for the quantized
race in `llm-bench --quantize`: Q8_0 or Q4_0 from the fetched Q4_1 SmolLM2 (requantizing is
allowed explicitly; the source weights were 4-bit, so Q8_0 stores 4-bit values in 8 bits).

    python requantize_gguf.py IN.gguf OUT.gguf q8_0|q4_0
"""
import ctypes
import os
import sys

import llama_cpp

src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.allow_requantize = True
params.nthread = os.cpu_count() or 1
tmp = dst + ".tmp"
rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
if rc != 0:
    sys.exit(f"llama_model_quantize returned {rc}")
os.replace(tmp, dst)
print(dst)
