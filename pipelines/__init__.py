"""Hydra entry points, one per stage: ``python -m pipelines.<stage> key=value ...``."""
