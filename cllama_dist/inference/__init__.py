"""Inference: loading a model, its tokenizer and an adapter (load.py), and generating from it (generate.py).

Used by eval, chat, export (an adapter is checked against its base as a load checks it) and the demo.
Which chat template formats the prompts is the templates' business (sft/templates.py).
"""
