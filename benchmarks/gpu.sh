#!/usr/bin/env bash
# The GPU checks in one go (about 13 minutes on one H100/H200, prepared and tried on a CPU):
# 1. BERT-Base width (12 x 768, seq 512, batch 32, bf16) eager and compiled side by side, with
#    plain-loop rows at depth 1 and 12 (the cost of a shallow Apollo step against a full one),
#    the attention kernel that ran and each step's profile: throughput-bert-<gpu>.json;
# 2. the acceleration benchmark's GPU preset (the scratch frontier and the released recipe, one
#    seed, at most 8 minutes): acceleration-gpt-gpu.json and .png;
# 3. the transfer to that preset's 8 x 160 target (benchmarks/transfer.py, one seed, on the
#    frontier step 2 cached): transfer-gpt-gpu.json and .png. It needs the proxy's finished
#    search: run `python -m benchmarks.transfer` (or the study) here first and carry
#    outputs/transfer-gpt and outputs/baselines with the run;
# 4. the GPU tests. Results go to benchmarks/results/ (and a copy under $OUT when that is set).
#
#   bash benchmarks/gpu.sh            # SKIP_THROUGHPUT=1 for step 2 and 3 only
#
# The device machine cannot prepare data (no gensim or sotu there): prepare it here first,
#   python -m benchmarks.acceleration --kind gpt --preset gpu --prepare-only
# and carry data/accel-gpt-v257-demo-sotu with the run.
#
# On a machine whose Python lacks some of apollo_ray's needs (pydantic, say), put their wheels
# in .whl/ first; they are installed into /tmp/site for this run only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  $PY -m benchmarks.throughput --kind bert --layers 12 --d-model 768 --head-dim 64 \
    --seq-len 512 --micro-batch 32 --depths 1,12 --steps 20 --rounds 3 --run-steps 0
  if [ -n "${OUT:-}" ]; then cp benchmarks/results/throughput-bert-*.json "$OUT"/; fi
fi
timeout 600 $PY -m benchmarks.acceleration --kind gpt --preset gpu --quiet || true
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/acceleration-gpt-gpu.* "$OUT"/ 2>/dev/null || true
  tar czf "$OUT/acceleration-gpt-gpu-runs.tgz" benchmarks/results/acceleration/gpt-gpu || true
fi
if [ -d outputs/transfer-gpt ]; then
  timeout 300 $PY -m benchmarks.transfer --preset gpu --seeds 1 --quiet || true
  if [ -n "${OUT:-}" ]; then cp benchmarks/results/transfer-gpt-gpu.* "$OUT"/ 2>/dev/null || true; fi
fi
# the trainer on the GPU: bf16, a run resumed from its checkpoint logs the uninterrupted losses
$PY -m pytest -q -m gpu tests/
