#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, the CUDA demo, the whole benchmark table.
#   bash tools/gpu.sh                   tests + demo + benches (end-to-end step first, then the layer grid)
#   GPU_TESTS=0 / GPU_DEMO=0 / GPU_BENCH=0   leave a part out
#   GPU_TOOLS                           development scripts to run before the benches, each within
#                                       TOOL_TIMEOUT (default 120) s (GPU_TOOLS=tools/profile_multi_lora.py)
#   TEST_ARGS / BENCH_ARGS              extra pytest args, shell-quoted (BENCH_ARGS='-k "train_step or 4096-4096"')
#   BENCH_FILES                         the bench files (default: every bench/bench_*.py, end-to-end first)
#   TEST_TIMEOUT / BENCH_TIMEOUT        seconds per part (defaults 240 / 420), so one call stays within
#                                       a 10-minute limit and the logs of a part that is cut survive
# Tests run on 8 workers (pytest-xdist) when it is installed: compiling the kernels is most of their time.
# Results (logs, JSON) go to $OUT or ./bench-results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTPEFT_BENCH_OUT="$OUT"
source tools/gpu_env.sh  # the wheels in .whl/ (bitsandbytes), fastpeft editable
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
eval "test_args=(${TEST_ARGS:-})"
eval "bench_args=(${BENCH_ARGS:-})"
status=0
if [ "${GPU_TESTS:-1}" = 1 ]; then
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests -q -rf --tb=short --maxfail=10 -p no:cacheprovider $workers "${test_args[@]}" 2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "${GPU_DEMO:-1}" = 1 ]; then
  timeout 180 python3 -m fastpeft demo --device cuda --output-dir /tmp/fastpeft-demo-adapter 2>&1 | tr '\r' '\n' | grep -v "step/s" | tee "$OUT/demo.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
for tool in ${GPU_TOOLS:-}; do
  timeout "${TOOL_TIMEOUT:-120}" python3 "$tool" 2>&1 | tee "$OUT/$(basename "$tool" .py).log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
if [ "${GPU_BENCH:-1}" = 1 ]; then
  files=${BENCH_FILES:-"bench/bench_e2e.py bench/bench_lora.py bench/bench_nf4.py bench/bench_qlora.py bench/bench_multi_lora.py bench/bench_multi_lora_generate.py"}
  timeout "${BENCH_TIMEOUT:-420}" python3 -m pytest $files -q -s -p no:cacheprovider --benchmark-disable-gc "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
