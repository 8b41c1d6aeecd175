#!/usr/bin/env bash
# Sets up a virtual environment from nothing (Python 3.11+) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The local CPU build of torch must come first, or the range in [test] would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Two worker processes (pytest-xdist), each taking whole test files: one process alone leaves half of
# a 2-core machine idle while XLA compiles. NUCGPT_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -q -n "${NUCGPT_TEST_WORKERS:-2}" --dist loadfile "$@"
