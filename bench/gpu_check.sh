#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (which has PyTorch, transformers, accelerate and
# peft, but not TRL, datasets or math-verify, and cannot download): the GPU tests (tests/test_gpu.py: every GRPO
# trainer on CUDA, evaluation on the GPU), then bench/gpu_scaling.py (STEER on Qwen2.5-0.5B with
# launch/accelerate/single_gpu.yaml, full and LoRA: step time, tokens/s, MFU, peak memory against `posttrain plan`).
#
#   bash bench/gpu_check.sh --download     # here, once: the missing packages as wheels into .whl/ (gitignored)
#   bash bench/gpu_check.sh                # on the GPU machine, .whl carried; results in $OUT (or outputs/gpu_check)
#
# Through the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600). About 7 minutes
# on one GPU; STEPS (3) and MAX_NEW_TOKENS (1024) shorten it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

WHEELS=(trl==1.16.0 transformers==5.19.0 datasets==5.2.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0
        antlr4-python3-runtime==4.13.2 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2)

if [[ ${1:-} == --download ]]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || exit 1
  du -sh .whl
  exit 0
fi

OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, trl, accelerate, peft, datasets; print(sys.version.split()[0], *(f'{m.__name__} {m.__version__}' for m in (torch, transformers, trl, accelerate, peft, datasets)))" \
  | tee -a "$OUT/gpu.txt" || exit 1

status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
(( PIPESTATUS[0] == 0 )) || status=1
timeout 420 python3 bench/gpu_scaling.py --steps "${STEPS:-3}" --max-new-tokens "${MAX_NEW_TOKENS:-1024}" \
  --out outputs/bench/gpu_scaling 2>&1 | grep -v "it/s\]$" | tail -60 | tee "$OUT/scaling.log"
(( PIPESTATUS[0] == 0 )) || status=1
cp outputs/bench/gpu_scaling/results.json outputs/bench/gpu_scaling/table.md "$OUT/" 2>/dev/null
exit $status
