"""Evaluation: loss, perplexity and bits per character of a model on text or shards (config.py, run.py,
perplexity.py), side by side for several models (table.py), and the exact-match share of held-out
instructions (instructions.py). Models load through inference/load.py."""

from .. import lazy_attributes

__getattr__ = lazy_attributes(__name__, {'evaluate': 'run', 'format_result': 'run', 'windows': 'perplexity',
                                           'Totals': 'perplexity', 'evaluate_instructions': 'instructions'})
