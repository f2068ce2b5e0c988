"""MaaS SDK: generated gRPC stubs (maas.<service>.v1), a typed client and the `maas` CLI."""

from maas.client import Client
from maas.errors import ApiError
from maas.tensors import from_tensor, signature, to_tensor

__all__ = ["ApiError", "Client", "from_tensor", "signature", "to_tensor"]
