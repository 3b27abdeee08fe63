#!/usr/bin/env bash
# Two source trees of fastpeft (say a commit and its parent) benched on one GPU machine in one call,
# interleaved (old new, then new old, ...), so a drift of the machine spreads over both.
#   git archive OLD_COMMIT | (mkdir -p ab-trees/old && tar -x -C ab-trees/old)   # ab-trees/ is git-ignored
#   bash tools/ab_trees.sh ab-trees/old . -k "train_step and fastpeft"
# Arguments: OLD_DIR NEW_DIR, then pytest arguments for the bench runs. Each tree runs its own bench
# files against its own package: fastpeft/ and kernels/ (as fastpeft.kernels, the mapping of
# pyproject.toml) are linked into a staging folder that pytest starts in, so the staged package comes
# first on sys.path and is imported before anything else (the run stops if another fastpeft is
# found); nothing is installed.
# Environment: AB_ROUNDS (default 2), BENCH_FILES (default "bench/bench_e2e.py bench/bench_lora.py",
# relative to each tree), BENCH_TIMEOUT (300 s per run), OUT (default bench-results).
# Writes $OUT/ab-old-r<round>.json and ab-new-r<round>.json, the table lines of each run to
# $OUT/ab.log, and the combined table (tools/ab_table.py) to $OUT/ab-table.md.
set -uo pipefail
[ $# -ge 2 ] || { sed -n '2,14p' "$0"; exit 2; }
old=$(realpath "$1") new=$(realpath "$2")
shift 2
here=$(realpath "$(dirname "$0")/..")
OUT=$(realpath -m "${OUT:-bench-results}")
mkdir -p "$OUT"
cd "$here"
GPU_ENV_EDITABLE=0 source tools/gpu_env.sh  # the wheels in .whl/ (bitsandbytes), nothing else
export PYTHONUNBUFFERED=1
read -r -a files <<< "${BENCH_FILES:-bench/bench_e2e.py bench/bench_lora.py}"
staging=$(mktemp -d "${TMPDIR:-/tmp}/fastpeft-ab.XXXXXX")
trap 'rm -rf "$staging"' EXIT

stage() {  # stage LABEL TREE: $staging/LABEL/fastpeft, each entry a link into TREE, and the pin
  local dest=$staging/$1/fastpeft entry
  [ -f "$2/fastpeft/__init__.py" ] && [ -d "$2/kernels" ] || { echo "$2: no fastpeft/ and kernels/ here" >&2; exit 2; }
  mkdir -p "$dest"
  for entry in "$2"/fastpeft/*; do
    [ "$(basename "$entry")" = __pycache__ ] || ln -s "$entry" "$dest/"
  done
  [ -e "$dest/kernels" ] || ln -s "$2/kernels" "$dest/kernels"
  # a pytest plugin (-p ab_pin), imported before any test or bench module: it imports the staged
  # package while the staging folder is first on sys.path, so every later import gets that one
  cat > "$staging/$1/ab_pin.py" <<PY
import os

import fastpeft
import fastpeft.kernels

found = [os.path.realpath(m.__file__) for m in (fastpeft, fastpeft.kernels)]
want = [os.path.realpath(os.path.join("$2", *p)) for p in (("fastpeft", "__init__.py"), ("kernels", "__init__.py"))]
print("package:", *found, flush=True)
if found != want:
    raise ImportError(f"fastpeft from {found}, expected {want}")
PY
}

run() {  # run LABEL TREE ROUND [pytest args]
  local label=$1 tree=$2 round=$3 json=$OUT/ab-$1-r$3.json
  shift 3
  rm -f "$json"
  (
    cd "$staging/$label" || exit 2
    FASTPEFT_BENCH_OUT="$json" timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest -c "$tree/pyproject.toml" \
      --rootdir "$tree" "${files[@]/#/$tree/}" -q -s -p no:cacheprovider --benchmark-disable-gc -p ab_pin "$@"
  ) 2>&1 | grep -E "^\||passed|failed|rror|skipped|^package:" | sed "s/^/$label r$round /" | tee -a "$OUT/ab.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  [ -f "$json" ] && results+=("$label=$json")
}

stage old "$old"
stage new "$new"
status=0
results=()
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  if [ $((round % 2)) = 1 ]; then
    run old "$old" "$round" "$@"; run new "$new" "$round" "$@"
  else
    run new "$new" "$round" "$@"; run old "$old" "$round" "$@"
  fi
done
if [ ${#results[@]} -gt 0 ]; then
  python3 tools/ab_table.py "${results[@]}" | tee "$OUT/ab-table.md"
fi
exit $status
