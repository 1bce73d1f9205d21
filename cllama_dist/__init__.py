"""cllama-dist: extend a LLaMA-family model to a new language (the Chinese-LLaMA recipe), at cluster scale."""

__version__ = "0.1.0"
