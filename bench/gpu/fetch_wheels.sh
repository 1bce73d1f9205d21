#!/usr/bin/env bash
# Rebuild .whl/ (git-ignored through .git/info/exclude) for the lent GPU machines: Python 3.12,
# x86-64 manylinux, no internet there. Run HERE (a machine whose pip reaches PyPI), from anywhere:
#   bash bench/gpu/fetch_wheels.sh
# What is fetched, and why, is in bench/gpu/WHEELS.md. Keep one version of each package in .whl/:
# the device install line takes .whl/*.whl, and two versions of one name stop the whole install.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
W="$REPO/.whl"
DS_VERSION="${DS_VERSION:-0.19.8}"

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf "$W"; mkdir -p "$W/fallback"

# 1. DeepSpeed ships only an sdist: build a pure-Python wheel, no ops compiled (they JIT at run time).
#    --no-cache-dir: never reuse a wheel cached from a build with other DS_BUILD_* settings.
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && DS_BUILD_OPS=0 python3 -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
    "deepspeed==$DS_VERSION" -w "$W")

# 2. Everything else as binary wheels for CPython 3.12 / manylinux x86-64 (README.md of the device tool).
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${PLAT[@]}" -d "$@"; }
dl "$W" \
    hjson==3.1.0 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    submitit==1.5.4 \
    zstandard==0.25.0
# Installed by setup.sh only if the machine's typing_extensions is older than pydantic-core needs.
dl "$W/fallback" typing_extensions==4.16.0

# 3. Checks: one version per name, DeepSpeed pure Python.
dup="$(ls "$W"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
[ -z "$dup" ] || { echo "duplicate packages in .whl: $dup" >&2; exit 1; }
ds="$(ls "$W"/deepspeed-*.whl)"
case "$ds" in *-py3-none-any.whl) ;; *) echo "DeepSpeed wheel is not py3-none-any: $ds" >&2; exit 1;; esac
if unzip -l "$ds" | grep -qE '\.(so|pyd)$'; then echo "compiled objects in $ds" >&2; exit 1; fi
ls -l "$W" "$W/fallback"
du -sh "$W"
