"""gRPC face of MonitoringService: proto <-> domain only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from maas.gateway.v1 import monitoring_pb2, monitoring_pb2_grpc

from services.gateway.audit import AuditLog
from services.gateway.audited import audited
from services.gateway.auth import current_caller
from services.gateway.monitoring import Monitoring, Report
from services.gateway.monitoring_store import LoggingRecord, SampleRecord

SERVICE = "maas.gateway.v1.MonitoringService"


def _deployment_named(request: Any, response: Any) -> str:
    return request.deployment


class MonitoringServicer(monitoring_pb2_grpc.MonitoringServiceServicer):
    def __init__(self, monitoring: Monitoring, audit: AuditLog | None = None) -> None:
        self.monitoring = monitoring
        self.audit = audit

    @audited(SERVICE, lambda request, response: request.logging.deployment)
    async def SetPredictionLogging(self, request, context):
        wanted = request.logging
        record = await self.monitoring.set_logging(
            current_caller().tenant,
            wanted.deployment,
            wanted.sample_rate,
            wanted.byte_budget_per_day,
            wanted.keep_payloads,
            wanted.retention_days,
        )
        return monitoring_pb2.SetPredictionLoggingResponse(logging=logging_to_proto(record))

    async def GetPredictionLogging(self, request, context):
        record = await self.monitoring.get_logging(current_caller().tenant, request.deployment)
        return monitoring_pb2.GetPredictionLoggingResponse(logging=logging_to_proto(record))

    async def ListPredictionSamples(self, request, context):
        samples = await self.monitoring.samples(current_caller().tenant, request.deployment, request.limit)
        return monitoring_pb2.ListPredictionSamplesResponse(samples=[sample_to_proto(s) for s in samples])

    async def GetDrift(self, request, context):
        report = await self.monitoring.drift(current_caller().tenant, request.deployment)
        return report_to_proto(report)

    @audited(SERVICE, _deployment_named)
    async def Feedback(self, request, context):
        labels = [(label.request_id, label.value) for label in request.labels]
        matched, unmatched = await self.monitoring.feedback(current_caller().tenant, request.deployment, labels)
        return monitoring_pb2.FeedbackResponse(matched=matched, unmatched_request_ids=unmatched)


def logging_to_proto(record: LoggingRecord) -> monitoring_pb2.PredictionLogging:
    return monitoring_pb2.PredictionLogging(
        deployment=record.deployment,
        sample_rate=record.sample_rate,
        byte_budget_per_day=record.byte_budget_per_day,
        keep_payloads=record.keep_payloads,
        retention_days=record.retention_days,
    )


def sample_to_proto(sample: SampleRecord) -> monitoring_pb2.PredictionSample:
    proto = monitoring_pb2.PredictionSample(
        request_id=sample.request_id,
        version=sample.version,
        time=_timestamp(sample.time),
        inputs_json=sample.inputs_json or "",
        outputs_json=sample.outputs_json or "",
    )
    if sample.label is not None:
        proto.label = sample.label
    return proto


def report_to_proto(report: Report) -> monitoring_pb2.GetDriftResponse:
    live = monitoring_pb2.LiveQuality(labelled=report.live.labelled, metric=report.live.metric, value=report.live.value)
    if report.live.test_value is not None:
        live.test_value = report.live.test_value
    return monitoring_pb2.GetDriftResponse(
        deployment=report.deployment,
        version=report.version,
        window_start=_timestamp(report.window_start),
        window_end=_timestamp(report.window_end),
        samples=report.samples,
        has_baseline=report.has_baseline,
        features=[monitoring_pb2.FeatureDrift(feature=name, psi=psi) for name, psi in report.features],
        output_psi=report.output_psi,
        classes=[
            monitoring_pb2.ClassShift(class_index=c.index, baseline_share=c.baseline, window_share=c.window)
            for c in report.classes
        ],
        threshold=report.threshold,
        drifted=report.drifted,
        live=live,
    )


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
