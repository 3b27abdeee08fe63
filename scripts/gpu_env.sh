# Sourced by scripts/gpu.sh and scripts/ab.sh on the GPU machine (from the repository root): the
# wheels it lacks (bitsandbytes etc., fetched by ../shared/gpu/fetch-wheels.sh into .whl/) and
# fastpeft itself, editable.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING" || true
