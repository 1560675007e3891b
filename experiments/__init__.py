"""Experiment scripts: one per figure; ``python -m experiments.reproduce`` runs them all."""
