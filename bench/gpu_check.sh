#!/usr/bin/env bash
# The one device command: every GPU check of ftkit in one run that ends within 7 minutes (bundle unpacking included,
# so a second try fits in the device's 15), writing $OUT/gpu_report.md (pass/fail/time per step, the measured tables)
# and each step's full log.
#
#   1 env                ftkit's requirements and the bundle against what is installed; every runtime dependency
#                        through ftkit's own code (tokenizer, the four tasks, verifiers, NF4 on the GPU)
#   2 pytest -m gpu      CUDA grouped vs loop numerics in bf16 (expert ranks 4/12/16), determinism, load-time peak
#   3 the user's path    2-layer true-width random checkpoint + char tokenizer; `ftkit train` with the real Sudoku
#                        recipe (4-bit experts, LoRA attention + experts, lean loss, both stacks checkpointed) for 20
#                        steps; `ftkit eval` on 16 puzzles; `ftkit generate` once
#   4 throughput         bench/train_throughput.py at L = 2, 4: ftkit 4-bit vs transformers+PEFT 4-bit vs Unsloth
#   5 memory             bench/memory_budget.py: measured peak beside the prediction
# Each step has its own time limit (bench/gpu_check.py: STEP_LIMITS, from the rehearsal's measured times) and keeps
# its full output (tracebacks included) in $OUT/<step>.log; the report quotes the end of a failed step's log and
# names any package that could not be imported.
#
# What the device lacks travels as one bundle, listed in bench/gpu_bundle.txt (exact versions; the image's packages
# are in bench/gpu_image_packages.txt). Build it once on the development machine, from the repository root (PyPI
# downloads only; `.gpu/` is git-ignored):
#   ../shared/tools/device-site .gpu -r bench/gpu_bundle.txt
# (`../shared` is the shared tools folder beside the main checkout.) Then one device call, carrying `.gpu`:
#   bash bench/gpu_check.sh              # timeout_s 480, carry [".gpu"]; returns gpu_report.md + 5 logs
# `bash bench/gpu_check.sh gpu --steps 3` reruns one step. Unsloth is optional and not carried; its row says why.
#
# Without a GPU, `bash bench/gpu_check.sh smoke` is the rehearsal: the same steps at tiny widths on the CPU, with every
# installed package that the image lacks and the bundle does not carry made unimportable (bench/rehearsal/), so a
# package missing from the bundle fails here by name (tests/test_gpu_check.py runs it: the runbook cannot rot).
# OUT defaults to /tmp/ftkit-gpu-check.
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
    echo "warning: no .gpu/site.tar.gz (build it: see the header); step 1 will name what is missing" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" bench/gpu_check.py "$mode" --out "$out" --started "$started" "${@:2}"
