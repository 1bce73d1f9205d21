#!/usr/bin/env bash
# The project's test command (README, CI):   bash tests/run.sh [pytest args]
# Installs the package with its test extra (CPU torch pinned), then runs the whole suite, printing the 25
# slowest tests at the end (CI's record of where the time goes; a later --durations=N overrides). Tests that
# need the real-world fixtures read them from $CLLAMA_FIXTURES (default ../shared/fixtures) and skip
# cleanly where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"
export CLLAMA_FIXTURES="${CLLAMA_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"
exec python3 -m pytest --durations=25 "$@"
