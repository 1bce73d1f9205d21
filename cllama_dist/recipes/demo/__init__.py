"""The demo recipe (recipe.py): the whole pipeline on the shipped corpus, on a CPU, in minutes."""


def run(cfg):
    """Run the demo for a DemoConfig; returns every stage's result by name."""
    from .recipe import run as run_recipe

    return run_recipe(cfg)
