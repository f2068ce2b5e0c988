"""Inference service: deployments (desired state) of registry versions onto NVIDIA Triton, and Predict."""
