#!/usr/bin/env bash
# The project's test command (README, CI):   bash tests/run.sh [pytest args]
# Installs the package with its test extra (CPU torch pinned), then runs the whole suite, printing the 25
# slowest tests at the end (CI's record of where the time goes; a later --durations=N overrides). Two workers
# (pytest-xdist, whole files each: module fixtures are shared within a file) by default, CLLAMA_TEST_WORKERS=N for
# another count (0: one process): on the 2-core machine the suite's process launches wait as much as they compute,
# so two workers take about 0.7 of the sequential time (docs/development.md). Tests that
# need the real-world fixtures read them from $CLLAMA_FIXTURES (default ../shared/fixtures) and skip
# cleanly where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"
export CLLAMA_FIXTURES="${CLLAMA_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"
workers="${CLLAMA_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadfile)
fi
exec python3 -m pytest --durations=25 "${parallel[@]}" "$@"
