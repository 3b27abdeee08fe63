#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, the CUDA demo, the whole benchmark table.
#   bash scripts/gpu.sh                 tests + demo + benches
#   GPU_TESTS=0 bash scripts/gpu.sh     benches only;  GPU_BENCH=0: tests + demo only
# The device tool stops a command after 10 minutes: with the full grid, make two calls
# (GPU_BENCH=0, then GPU_TESTS=0).
#   BENCH_ARGS="-k 4096x4096" ...  extra pytest args for bench/;  TEST_ARGS likewise for tests/
# Results (logs, JSON) go to $OUT (the device tool's folder) or ./bench-results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTPEFT_BENCH_OUT="$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # bitsandbytes etc., fetched by ../shared/gpu/fetch-wheels.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING" || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
if [ "${GPU_TESTS:-1}" = 1 ]; then
  python3 -m pytest tests -q -x -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
  python3 -m fastpeft demo --device cuda --output-dir /tmp/fastpeft-demo-adapter 2>&1 | tee "$OUT/demo.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "${GPU_BENCH:-1}" = 1 ]; then
  python3 -m pytest bench -q -s -p no:cacheprovider --benchmark-disable-gc ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
