#!/usr/bin/env bash
# A/B on the GPU machine in one call: the same bench rows with one switch at each value, interleaved
# over rounds (v1 v2 v1 v2 ...), so a drift of the machine spreads over both instead of landing on one.
#   AB_VAR=FASTPEFT_TMA_MIN_M AB_VALUES="0 4096" AB_ROUNDS=2 BENCH_ARGS='-k "train_step and fastpeft"' bash scripts/ab.sh
# AB_VALUES: space-separated; "-" leaves AB_VAR unset. BENCH_FILES (default: both bench files) picks the
# files. Each run writes $OUT/ab-<value>-r<round>.json and its table lines, prefixed with the value, to
# $OUT/ab.log (one log and AB_ROUNDS x values JSON files: keep that under the device tool's file limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
: "${AB_VAR:?AB_VAR names the switch to vary}" "${AB_VALUES:?AB_VALUES lists its values}"
source scripts/gpu_env.sh  # the wheels in .whl/ (bitsandbytes), fastpeft editable
export PYTHONUNBUFFERED=1
eval "bench_args=(${BENCH_ARGS:-})"
read -r -a files <<< "${BENCH_FILES:-bench/bench_e2e.py bench/bench_lora.py}"
status=0
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for value in $AB_VALUES; do
    if [ "$value" = "-" ]; then unset "$AB_VAR"; else export "$AB_VAR=$value"; fi
    FASTPEFT_BENCH_OUT="$OUT/ab-$value-r$round.json" timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest "${files[@]}" -q -s \
      -p no:cacheprovider --benchmark-disable-gc "${bench_args[@]}" 2>&1 | grep -E "^\||passed|failed|rror" \
      | sed "s/^/$AB_VAR=$value r$round /" | tee -a "$OUT/ab.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
done
exit $status
