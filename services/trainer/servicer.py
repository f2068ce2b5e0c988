"""gRPC face of the trainer. Jobs are not implemented yet: every method says so plainly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

NOT_YET = (
    "training jobs are not available in this release of the trainer service; "
    "upload a TorchScript or ONNX artifact with RegistryService.UploadVersion instead"
)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    async def CreateTrainingJob(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_YET)

    async def GetJob(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_YET)

    async def ListJobs(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_YET)

    async def CancelJob(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_YET)

    async def WatchJob(self, request, context) -> AsyncIterator[trainer_pb2.WatchJobResponse]:  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_YET)
        yield trainer_pb2.WatchJobResponse()  # unreachable; makes this an async generator
