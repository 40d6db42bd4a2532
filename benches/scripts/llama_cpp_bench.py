#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) on a GGUF: the measurements `llm-bench` makes for Acorn and
ONNX Runtime, printed as one JSON line. Prompts: Hamlet tokens 300..428 (as llm-bench).

    python llama_cpp_bench.py MODEL.gguf --text hamlet_gut.txt [--threads 1] [--decode 32]
"""
import argparse
import json
import statistics
import time

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--text", required=True)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--decode", type=int, default=32)
a = ap.parse_args()

from llama_cpp import Llama  # noqa: E402

t0 = time.perf_counter()
llm = Llama(a.gguf, n_ctx=512, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False)
open_ms = (time.perf_counter() - t0) * 1e3
ids = llm.tokenize(open(a.text, encoding="utf-8").read().encode(), add_bos=False, special=False)[300:428]
llm.reset()
llm.eval(ids[:32])
ttft_ms = (time.perf_counter() - t0) * 1e3


def prefill(n):
    times = []
    for _ in range(5):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n])
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


p32, p128 = prefill(32), prefill(128)
llm.reset()
llm.eval(ids)
steps = []
for _ in range(a.decode):
    nxt = int(llm.scores[llm.n_tokens - 1].argmax())
    t = time.perf_counter()
    llm.eval([nxt])
    steps.append(time.perf_counter() - t)
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"open_ms": open_ms, "ttft_ms": ttft_ms, "prefill32_tps": p32, "prefill128_tps": p128,
                  "decode_tps": 1 / statistics.median(steps), "peak_rss_mb": rss}))
