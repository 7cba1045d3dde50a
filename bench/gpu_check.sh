#!/usr/bin/env bash
# The one device command: every GPU check of ftkit in one run that fits the device's 8 minutes (bundle unpacking
# included), writing $OUT/gpu_report.md (pass/fail/time per step, the measured tables) and each step's full log.
#
#   1 pytest -m gpu      CUDA grouped vs loop numerics in bf16 (expert ranks 4/12/16), determinism, load-time peak
#   2 the user's path    2-layer true-width random checkpoint + char tokenizer; `ftkit train` with the real Sudoku
#                        recipe (4-bit experts, LoRA attention + experts, lean loss, both stacks checkpointed) for 20
#                        steps; `ftkit eval` on 16 puzzles; `ftkit generate` once
#   3 throughput         bench/train_throughput.py at L = 2, 4: ftkit 4-bit vs transformers+PEFT 4-bit vs Unsloth
#   4 memory             bench/memory_budget.py: measured peak beside the prediction
# Each step has its own time limit (bench/gpu_check.py) and keeps its full output (tracebacks included) in
# $OUT/<step>.log; the report quotes the end of a failed step's log.
#
# The device image has torch, accelerate, safetensors, tokenizers, pytest, but transformers 5.17 and no
# bitsandbytes. Build the carried bundle once on the development machine, from the repository root (it only
# downloads three wheels from PyPI; ~14 MB; `.gpu/` is git-ignored):
#   ../shared/tools/device-site .gpu transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2
# (`../shared` is the shared tools folder beside the main checkout.) Then one device call, carrying `.gpu`:
#   bash bench/gpu_check.sh              # timeout_s 540; returns gpu_report.md + 4 logs
# Unsloth is optional: it pins transformers<=5.17 and is not in the bundle, so its row says why it cannot import.
#
# Without a GPU, `bash bench/gpu_check.sh smoke` runs the same steps at tiny widths on the CPU (tests/test_gpu_check.py
# runs it, so this runbook cannot rot). OUT defaults to /tmp/ftkit-gpu-check.
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
mode="${1:-gpu}"
case "$mode" in gpu|smoke) ;; *) echo "usage: bash bench/gpu_check.sh [gpu|smoke]" >&2; exit 2 ;; esac
out="${OUT:-/tmp/ftkit-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"

if [ "$mode" = gpu ]; then
  if [ -f .gpu/site.tar.gz ]; then
    site=/tmp/ftkit-site
    rm -rf "$site" && mkdir -p "$site" && tar xzf .gpu/site.tar.gz -C "$site" || { echo "cannot unpack .gpu/site.tar.gz" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: no .gpu/site.tar.gz (see the header): using the image's own transformers/peft/bitsandbytes" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" bench/gpu_check.py "$mode" --out "$out" --started "$started" "${@:2}"
