"""Trainer service: training jobs on built-in architectures and datasets, run in worker processes."""
