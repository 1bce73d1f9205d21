#!/usr/bin/env bash
# bench/gpu/setup.sh: first step of every call on a lent GPU machine (H100/H200, Python 3.12, no internet).
#
#   source bench/gpu/setup.sh || exit 1     # installs .whl/*.whl into /tmp/site, exports PYTHONPATH etc., checks
#   bash bench/gpu/setup.sh check           # the same install and checks; nothing is exported to the caller
#
# The device call must carry the wheels:  run(carry=[".whl"], command="source bench/gpu/setup.sh || exit 1; ...")
# .whl/ is made here by bench/gpu/fetch_wheels.sh (see bench/gpu/WHEELS.md). The project itself travels as
# source: PYTHONPATH=/tmp/site:<repo root>.
#
# Fails fast (non-zero, one "SETUP FAILED: ..." line) if a wheel does not install, CUDA is not usable, or a
# package the trainer needs does not import. Missing optional packages (datasets, submitit, tensorboard,
# flash_attn) are reported, not fatal.
#
# Knobs (environment): PYTHON (default python3), SITE_DIR (default /tmp/site), WHL_DIR (default <repo>/.whl),
#   SETUP_ALLOW_NO_CUDA=1 (dry run on a CPU box: skip nvidia-smi and the CUDA checks).

_gpu_setup_main() {
    local py="${PYTHON:-python3}"
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)" || { echo "SETUP FAILED: cannot find repo root" >&2; return 1; }
    local site="${SITE_DIR:-/tmp/site}"
    local whl="${WHL_DIR:-$repo/.whl}"
    local t0=$SECONDS

    echo "== gpu setup: repo $repo, wheels $whl -> $site"
    command -v "$py" >/dev/null || { echo "SETUP FAILED: no $py on PATH" >&2; return 1; }
    ls "$whl"/*.whl >/dev/null 2>&1 || {
        echo "SETUP FAILED: no wheels in $whl (run bench/gpu/fetch_wheels.sh here and pass carry=[\".whl\"])" >&2
        return 1; }

    # Environment first, so that the checks below see what the caller's commands will see.
    export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"
    export PYTHONUNBUFFERED=1
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"   # DeepSpeed JIT ops, if any
    export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

    # The device tool's README install line (python3 -> $py, paths absolute).
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl || {
        echo "SETUP FAILED: wheel install into $site failed (device python: $("$py" -V 2>&1); wheels are for CPython 3.12 x86-64)" >&2
        return 1; }

    # pydantic-core 2.46 needs typing_extensions >= 4.14.1; carry ours only where the machine's is older.
    if ! "$py" - <<'EOF'
import importlib.metadata as m, sys
from packaging.version import Version
try:
    v = m.version("typing_extensions")
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if Version(v) >= Version("4.14.1") else 1)
EOF
    then
        echo "-- typing_extensions missing or < 4.14.1: installing $(ls "$whl"/fallback/typing_extensions-*.whl 2>/dev/null)"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$whl"/fallback/typing_extensions-*.whl || { echo "SETUP FAILED: typing_extensions fallback install" >&2; return 1; }
    fi

    if [ "${SETUP_ALLOW_NO_CUDA:-0}" != 1 ]; then
        command -v nvidia-smi >/dev/null || { echo "SETUP FAILED: nvidia-smi not found" >&2; return 1; }
        nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv,noheader || {
            echo "SETUP FAILED: nvidia-smi could not query the GPU" >&2; return 1; }
    fi
    local tool
    for tool in nvcc ninja g++ c++; do
        if command -v "$tool" >/dev/null; then
            echo "-- $tool: $("$tool" --version 2>&1 | grep -m1 -iE 'release|[0-9]+\.[0-9]+')"
        else
            echo "-- $tool: absent (DeepSpeed JIT ops would not build)"
        fi
    done

    SETUP_SITE="$site" "$py" - <<'EOF' || { echo "SETUP FAILED: see the FAIL lines above" >&2; return 1; }
import importlib, importlib.metadata as md, importlib.util, os, platform, sys, time

fails = []
def fail(msg):
    print("FAIL:", msg); fails.append(msg)

def ver(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"

print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch
    print(f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
          f"nccl {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
except Exception as e:
    fail(f"import torch: {e!r}")
    torch = None

if os.environ.get("SETUP_ALLOW_NO_CUDA") != "1" and torch is not None:
    if not torch.cuda.is_available():
        fail("torch.cuda.is_available() is False")
    else:
        n = torch.cuda.device_count()
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.1f} GiB "
                  f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
        try:
            a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize(); float((a @ a).float().abs().sum())
        except Exception as e:
            fail(f"tiny bf16 matmul on cuda:0: {e!r}")
        if not torch.distributed.is_nccl_available():
            fail("torch.distributed NCCL backend not available")

# Required: the trainer's stack. (module, distribution name)
required = [("transformers", "transformers"), ("peft", "peft"), ("sentencepiece", "sentencepiece"),
            ("pyarrow", "pyarrow"), ("numpy", "numpy"), ("yaml", "PyYAML"), ("zstandard", "zstandard"),
            ("safetensors", "safetensors"), ("google.protobuf", "protobuf"), ("tqdm", "tqdm"),
            ("psutil", "psutil"), ("pydantic", "pydantic"), ("hjson", "hjson")]
for mod, dist in required:
    try:
        m = importlib.import_module(mod)
        print(f"{dist} {ver(dist)}")
    except Exception as e:
        fail(f"import {mod}: {e!r}")

t = time.time()
try:
    import deepspeed
    from deepspeed.ops.adam import FusedAdam  # noqa: F401  (class import only: nothing is JIT-built here)
    site = os.environ["SETUP_SITE"]
    where = os.path.dirname(os.path.dirname(deepspeed.__file__))
    print(f"deepspeed {deepspeed.__version__} from {where} (import {time.time() - t:.1f} s); "
          f"accelerator {deepspeed.get_accelerator()._name}")
    if os.path.realpath(where) != os.path.realpath(site):
        print(f"WARN: deepspeed imported from {where}, not from {site}")
    if os.environ.get("SETUP_ALLOW_NO_CUDA") != "1" and deepspeed.get_accelerator()._name != "cuda":
        fail(f"DeepSpeed accelerator is {deepspeed.get_accelerator()._name}, not cuda")
    try:  # informational: whether FusedAdam *could* be JIT-built here (runs nvcc -V; builds nothing)
        from deepspeed.ops.op_builder import FusedAdamBuilder
        print(f"FusedAdam JIT-compatible: {FusedAdamBuilder().is_compatible(verbose=False)}")
    except Exception as e:
        print(f"FusedAdam JIT-compatible: unknown ({e!r})")
except Exception as e:
    fail(f"import deepspeed / FusedAdam: {e!r}")

try:
    import cllama_dist
    print(f"cllama_dist from {os.path.dirname(cllama_dist.__file__)}")
except Exception as e:
    fail(f"import cllama_dist (project source on PYTHONPATH): {e!r}")

# Optional: reported only.
for mod, dist in [("datasets", "datasets"), ("submitit", "submitit"), ("tensorboard", "tensorboard"),
                  ("flash_attn", "flash-attn"), ("triton", "triton")]:
    if importlib.util.find_spec(mod) is None:
        print(f"(optional) {dist}: absent")
        continue
    try:
        importlib.import_module(mod)
        print(f"(optional) {dist} {ver(dist)}")
    except Exception as e:
        print(f"(optional) {dist} {ver(dist)} does not import: {e!r}")
print("versions datasets leans on: " + ", ".join(f"{d} {ver(d)}" for d in
      ("fsspec", "huggingface-hub", "pandas", "xxhash", "dill", "multiprocess", "typing_extensions")))

if fails:
    print(f"{len(fails)} check(s) failed")
    sys.exit(1)
EOF
    echo "== gpu setup OK in $((SECONDS - t0)) s; PYTHONPATH=$PYTHONPATH"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: exports stay in the caller's shell; failure returns non-zero (use `source ... || exit 1`).
    _gpu_setup_main
    _gpu_setup_rc=$?
    unset -f _gpu_setup_main
    return $_gpu_setup_rc
else
    case "${1:-check}" in
        check) _gpu_setup_main; exit $? ;;
        *) echo "usage: source bench/gpu/setup.sh  |  bash bench/gpu/setup.sh check" >&2; exit 2 ;;
    esac
fi
