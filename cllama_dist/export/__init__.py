"""Export of a run: a PEFT adapter, and a merged Hugging Face model (config.py, run.py)."""

from .. import lazy_attributes

__getattr__ = lazy_attributes(__name__, {'export_adapter': 'run', 'export_merged': 'run', 'read_adapter': 'run', 'pick_checkpoint': 'run'})
