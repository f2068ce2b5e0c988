"""Gateway: the one public endpoint. Authenticates API keys, forwards the public APIs to the
internal services and serves Predict and the Open Inference Protocol straight to Triton."""
