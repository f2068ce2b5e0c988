"""The generic Triton python-backend model (model.py) copied into every deployment's model directory.

model.py runs inside Triton's python backend stub, never in the service's process.
"""
