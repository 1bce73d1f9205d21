"""The trainer, as components: config.py (the run's sections), setup.py (the run resolved: ``resolve(cfg) ->
RunSpec``), plan.py (batch arithmetic), stages.py (the schedule: a plain run is one stage), engine.py
(DeepSpeed), state.py (what a checkpoint records; the run's identity), checkpoint.py (saving, resuming, when
to save), metrics.py, validate.py, and loop.py (the Trainer built from the spec, and one readable loop)."""

from .. import lazy_attributes

__getattr__ = lazy_attributes(__name__, {'Trainer': 'loop', 'train': 'loop', 'read_metrics': 'metrics', 'EXIT_STOPPED': 'loop', 'EXIT_DONE': 'loop', 'EXIT_NONFINITE': 'loop', 'STOP_FILE': 'loop'})
