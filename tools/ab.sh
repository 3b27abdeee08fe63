#!/usr/bin/env bash
# A/B of one switch on the GPU machine in one call: the same bench rows with the switch at each value,
# interleaved over rounds (v1 v2, then v2 v1, ...), so a drift of the machine spreads over both.
#   AB_VAR=FASTPEFT_TMA_MIN_M AB_VALUES="0 4096" BENCH_ARGS='-k "train_step and fastpeft"' bash tools/ab.sh
# AB_VALUES: space-separated; "-" leaves AB_VAR unset. AB_ROUNDS (default 2). BENCH_FILES (default: both
# bench files) picks the files, BENCH_TIMEOUT (300) limits each run. Each run writes
# $OUT/ab-<value>-r<round>.json and its table lines, prefixed with the value, to $OUT/ab.log; the
# combined table (tools/ab_table.py: each value's mean over its rounds, and the ratios) goes to
# $OUT/ab-table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
: "${AB_VAR:?AB_VAR names the switch to vary}" "${AB_VALUES:?AB_VALUES lists its values}"
source tools/gpu_env.sh  # the wheels in .whl/ (bitsandbytes), fastpeft editable
export PYTHONUNBUFFERED=1
eval "bench_args=(${BENCH_ARGS:-})"
read -r -a files <<< "${BENCH_FILES:-bench/bench_e2e.py bench/bench_lora.py}"
read -r -a values <<< "$AB_VALUES"
status=0
results=()
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  order=("${values[@]}")
  if [ $((round % 2)) = 0 ]; then  # every other round in reverse: A B, B A, ...
    order=()
    for ((i = ${#values[@]} - 1; i >= 0; i--)); do order+=("${values[i]}"); done
  fi
  for value in "${order[@]}"; do
    label=${value/#-/unset}
    if [ "$value" = "-" ]; then unset "$AB_VAR"; else export "$AB_VAR=$value"; fi
    json="$OUT/ab-$label-r$round.json"
    FASTPEFT_BENCH_OUT="$json" timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest "${files[@]}" -q -s \
      -p no:cacheprovider --benchmark-disable-gc "${bench_args[@]}" 2>&1 | grep -E "^\||passed|failed|skipped|rror" \
      | sed "s/^/$AB_VAR=$value r$round /" | tee -a "$OUT/ab.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    [ -f "$json" ] && results+=("$label=$json")
  done
done
if [ ${#results[@]} -gt 0 ]; then
  python3 tools/ab_table.py "${results[@]}" | tee "$OUT/ab-table.md"
fi
exit $status
