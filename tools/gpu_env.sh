# Sourced from the repository root by the tools that run on a GPU machine: wheels the machine lacks
# (put in .whl/, e.g. bitsandbytes) go to /tmp/site on PYTHONPATH, and fastpeft is installed editable
# (GPU_ENV_EDITABLE=0 leaves that out).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ "${GPU_ENV_EDITABLE:-1}" = 1 ]; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING" || true
fi
