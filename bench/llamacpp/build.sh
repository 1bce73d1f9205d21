#!/usr/bin/env bash
# Build what bench/llamacpp/check.py needs, from PyPI packages only, on the CPU, outside the checkout:
#
#   bash bench/llamacpp/build.sh [PREFIX]        # default PREFIX /tmp/llamacpp (venv in PREFIX/venv)
#
# 1. llama-cpp-python's source distribution from PyPI (it vendors llama.cpp: the C++ library, the
#    converter convert_hf_to_gguf.py and its gguf-py package);
# 2. llama.cpp's shared library (libllama + ggml) compiled from that copy with cmake, and nothing else: the
#    Python wheel would also build llama.cpp's `common` and the multimodal `mtmd` libraries, about 100 more
#    objects than the ~70 needed to convert, tokenize and generate (on 2 cores that is the difference between
#    roughly half an hour and more than an hour);
# 3. a venv (with the system's site-packages: torch, transformers, sentencepiece already installed for the
#    project) holding llama-cpp-python's Python bindings without their native build (they load the library
#    from LLAMA_CPP_LIB_PATH) and the vendored gguf-py.
#
# Set LLAMA_CPP_PYTHON_VERSION to pin another release; JOBS (default 1) for parallel compilation.
set -euo pipefail
PREFIX=${1:-/tmp/llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-1}
PY=${PYTHON:-python3}
mkdir -p "$PREFIX/dl"
cd "$PREFIX"

SDIST=$PREFIX/dl/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$PREFIX/dl"
fi
SRC=$PREFIX/llama_cpp_python-$VERSION
[ -d "$SRC" ] || tar xzf "$SDIST" -C "$PREFIX"
LLAMA=$SRC/vendor/llama.cpp

if [ ! -e "$PREFIX/build/bin/libllama.so" ]; then
    cmake -S "$LLAMA" -B "$PREFIX/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    cmake --build "$PREFIX/build" --target llama -j "$JOBS"
fi

if [ ! -x "$PREFIX/venv/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$PREFIX/venv"
fi
if ! "$PREFIX/venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    # The bindings only: their CMake project builds nothing with both switches off.
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" LLAMA_CPP_LIB_PATH="$PREFIX/build/bin" \
        "$PREFIX/venv/bin/python" -m pip install "$SDIST"   # its dependencies: diskcache (numpy, jinja2 found)
    "$PREFIX/venv/bin/python" -m pip install --no-deps "$LLAMA/gguf-py"
fi
echo "built: $PREFIX/build/bin/libllama.so; converter: $LLAMA/convert_hf_to_gguf.py; venv: $PREFIX/venv"
