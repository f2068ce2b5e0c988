"""Trainer service: training and optimization jobs (the job runner lands with its own issue)."""
