#!/usr/bin/env bash
# The GPU checks of docs/performance.md, in parts that each fit one 10-minute device command.
#
# On the development machine, once (the device image has torch, accelerate, safetensors, pyyaml, typer, pytest, but
# an older transformers and no bitsandbytes):
#   ../shared/tools/device-site .gpu transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2    # ~14 MB, git-ignored
# Then one device call per part, carrying `.gpu`:
#   bash bench/gpu_session.sh tests     # GPU tests of the 4-bit experts path (quant, load-time peak)
#   bash bench/gpu_session.sh train 2,4 # bench/train_throughput.py at these L (+ fit to 30 layers); then `train 8`
#   bash bench/gpu_session.sh memory    # bench/memory_budget.py: measured vs predicted peak
#   bash bench/gpu_session.sh denoise   # bench/denoise_throughput.py
# Each part writes its log to $OUT/<part>.log (the device tool returns $OUT). Without a GPU, `smoke` runs the same
# scripts at tiny widths on the CPU, to check the runbook itself.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: bench/gpu_session.sh tests|train|memory|denoise|smoke}"
out="${OUT:-/tmp/ftkit-gpu-session}"
mkdir -p "$out"

if [ -f .gpu/site.tar.gz ]; then
  mkdir -p /tmp/site && tar xzf .gpu/site.tar.gz -C /tmp/site
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=python3
[ -x .venv/bin/python ] && [ ! -f .gpu/site.tar.gz ] && py=.venv/bin/python

# Each step has its own time limit inside the part, so a hang still leaves the other steps' logs.
step() {
  local limit=$1; shift
  echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@"
  echo "== exit $?"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
  case "$part" in
    tests)
      step 420 $py -m pytest -p no:cacheprovider -q -rs tests/test_quant.py tests/test_quant_load.py tests/test_checkpointing.py tests/test_diffusion.py
      ;;
    train)
      step 540 $py bench/train_throughput.py --layers "${2:-2,4}" --grad-ckpt --loss-chunk 128 --workdir /tmp/ftkit-bench
      ;;
    memory)
      step 540 $py bench/memory_budget.py
      ;;
    denoise)
      step 300 $py bench/denoise_throughput.py --layers 4
      step 240 $py bench/denoise_throughput.py --layers 4 --experts-4bit
      ;;
    smoke)
      step 300 $py bench/train_throughput.py --tiny --layers 1,2 --steps 1 --warmup 0 --grad-ckpt
      step 300 $py bench/denoise_throughput.py --tiny
      ;;
    *)
      echo "unknown part: $part" >&2
      exit 2
      ;;
  esac
} 2>&1 | tee "$out/$part.log"
