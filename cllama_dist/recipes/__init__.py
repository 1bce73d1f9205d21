"""Recipes: declarative lists of stages run by one stage runner (runner.py). The demo is the first."""
