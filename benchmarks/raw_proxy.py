"""The floor of any one-call-per-call Python hop (issue 13): a grpc.aio server that forwards
ModelInfer's bytes to Triton and Triton's answer back, and nothing else (no auth, no limits, no
decoding). `make bench` runs it beside Triton direct and the gateway, in the same run.

    python -m benchmarks.raw_proxy --listen 127.0.0.1:PORT --triton 127.0.0.1:PORT [--token T]
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from services.common.channels import TRITON_TOKEN_HEADER

SERVICE = "inference.GRPCInferenceService"


async def serve(listen: str, triton: str, token: str) -> None:
    channel = grpc.aio.insecure_channel(triton)
    # No serializers on either side: the request and the answer stay bytes.
    forward = channel.unary_unary(f"/{SERVICE}/ModelInfer")
    metadata = ((TRITON_TOKEN_HEADER, token),) if token else ()

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await forward(request, metadata=metadata, timeout=context.time_remaining())

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--triton", required=True)
    parser.add_argument("--token", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.triton, args.token))


if __name__ == "__main__":
    main()
