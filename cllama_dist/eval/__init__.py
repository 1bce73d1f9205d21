"""Evaluation: loss, perplexity and bits per character of a model on text or shards (config.py, run.py), and the
exact-match share of held-out instructions (instructions.py)."""

from .. import lazy_attributes

__getattr__ = lazy_attributes(__name__, {'evaluate': 'run', 'format_result': 'run', 'Tokenizer': 'run', 'windows': 'run', 'Totals': 'run',
                                                  'evaluate_instructions': 'instructions'})
