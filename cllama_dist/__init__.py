"""cllama-dist: extend a LLaMA-family model to a new language (the Chinese-LLaMA recipe), at cluster scale."""

__version__ = "0.1.0"

from pathlib import Path

# The checkout: deepspeed_configs/, slurm/ and cllama_dist/train.py are found from here (editable install).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
