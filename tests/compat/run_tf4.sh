#!/usr/bin/env bash
# Check merged tokenizer folders with transformers 4.x, in a virtual environment of its own (no torch):
#
#     bash tests/compat/run_tf4.sh --corpus zh.jsonl FOLDER [FOLDER ...]
#
# The environment (CLLAMA_TF4_VENV, default /tmp/cllama-tf4) is built from requirements-tf4.txt with
# pip from PyPI the first time, and reused while that file is unchanged.
# Exit status: 0 checks passed, 1 a check failed, 3 the environment could not be built (no venv module,
# no network to PyPI): callers skip on 3. `run_tf4.sh --build-only` builds the environment and stops (the test
# suite starts it in the background at start-up, so that the download overlaps other tests).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CLLAMA_TF4_VENV:-/tmp/cllama-tf4}"
REQ="$HERE/requirements-tf4.txt"
STAMP="$VENV/.cllama-requirements"

if command -v flock >/dev/null; then  # two runs at once must not build the same environment twice
  exec 9>"$VENV.lock"
  flock 9
fi
if ! cmp -s "$REQ" "$STAMP" || ! "$VENV/bin/python" -c "import transformers, sentencepiece" 2>/dev/null; then
  rm -rf "$VENV"
  echo "building $VENV (transformers 4.x) ..." >&2
  python3 -m venv "$VENV" || { echo "python3 -m venv failed" >&2; exit 3; }
  if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check --timeout 30 --retries 2 -r "$REQ" >&2; then
    echo "pip could not install $REQ (offline?)" >&2
    rm -rf "$VENV"
    exit 3
  fi
  cp "$REQ" "$STAMP"
fi
if [ "${1:-}" = "--build-only" ]; then
  exit 0
fi
exec "$VENV/bin/python" "$HERE/check_hf_load.py" "$@"
