"""The trainer, as components: config.py (the run's sections), plan.py (batch arithmetic, schedule),
engine.py (DeepSpeed), checkpoint.py, metrics.py, validate.py, and loop.py (the Trainer: set-up steps and
one readable loop)."""

from .. import lazy_attributes

__getattr__ = lazy_attributes(__name__, {'Trainer': 'loop', 'train': 'loop', 'read_metrics': 'metrics', 'EXIT_STOPPED': 'loop', 'EXIT_DONE': 'loop', 'EXIT_NONFINITE': 'loop', 'STOP_FILE': 'loop'})
