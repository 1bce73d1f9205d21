"""Launchers: submitit (Python / `cllama submit`); the Slurm scripts live in slurm/."""
