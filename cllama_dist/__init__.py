"""cllama-dist: extend a LLaMA-family model to a new language (the Chinese-LLaMA recipe), at cluster scale."""

__version__ = "0.1.0"

from pathlib import Path

# The checkout: deepspeed_configs/ and slurm/ are found from here (editable install).
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def lazy_attributes(package: str, names: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) that imports ``package.<submodule>`` on first use of one of its names.

    The packages whose implementation needs torch (trainer, eval, export) keep their ``__init__`` light this
    way: their config modules are read by the CLI, which must start without importing torch.
    """

    def __getattr__(name: str):
        if name in names:
            import importlib

            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
