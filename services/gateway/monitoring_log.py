"""Prediction logging, the call path's side: which calls to log, and their recording off the call
path (no gRPC servicer here).

On the call path, a logged deployment costs one dict lookup and one random draw; a sampled call
is put, as the messages it was answered with, on a bounded queue, and nothing else: no SQL, no
Redis, no decoding. A background task decodes the tensors, keeps the predicted class (or value)
of every sampled call, the payloads when the deployment keeps them, and counts the inputs and
outputs into the summary of the call's time bucket, binned as its version's baseline is (read
once per version from the registry). Every `flush_seconds` what was logged is written to SQL,
each gateway process adding to its own rows of a bucket's summary. A full queue drops the sample
and counts it.

Each deployment's logging settings are read from SQL every `refresh_seconds` (and at once in
the process that changes them), so that every process of the gateway follows a change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from prometheus_client import Counter

from services.common import summaries
from services.common.channels import internal_metadata
from services.common.logs import request_id_var
from services.common.oip import TYPED_FIELD
from services.common.periodic import Periodic
from services.common.summaries import Summary
from services.common.tensors import BY_PROTO, BY_TRITON
from services.gateway.monitoring_store import LoggingRecord, MonitoringStore, SampleRecord, SummaryRecord

log = logging.getLogger(__name__)

LOGGED = Counter("maas_monitor_samples_logged_total", "Sampled predictions written to the gateway's SQL")
DROPPED = Counter(
    "maas_monitor_samples_dropped_total",
    "Sampled predictions not logged: queue_full (the recorder fell behind), undecodable, write_failed",
    ["reason"],
)
QUEUE_FULL, UNDECODABLE, WRITE_FAILED = (DROPPED.labels(r) for r in ("queue_full", "undecodable", "write_failed"))
OVER_BUDGET = Counter(
    "maas_monitor_payloads_over_budget_total",
    "Logged predictions whose payloads were not kept: their deployment's bytes of the day were spent",
)
# How long the recorder lets sampled calls gather once one is waiting: summarizing costs per
# feature and batch, so calls counted one by one as they come cost the process far more.
GATHER_SECONDS = 0.1
# How long a version that could not be read from the registry goes without a baseline before
# it is asked again.
VERSION_RETRY_SECONDS = 30.0
# Versions whose baselines are kept in memory; beyond it the oldest read is forgotten.
MAX_VERSIONS = 1000
REGISTRY_TIMEOUT_SECONDS = 10.0
# Task metadata the trainer registers a version with.
CLASSIFICATION, REGRESSION = "classification", "regression"


@dataclass(frozen=True)
class VersionInfo:
    """What monitoring needs of a version: its baseline (None when it has none), whether it is a
    classifier (None: unknown, judged by the width of its output) and its test-split figure."""

    baseline: Summary | None = None
    classifier: bool | None = None
    test_value: float | None = None


def version_info(version: registry_pb2.Version) -> VersionInfo:
    baseline = None
    if text := version.metadata.get(summaries.BASELINE_KEY):
        try:
            baseline = Summary.from_json(text)
        except (ValueError, KeyError, TypeError) as error:
            log.warning(
                "a version's baseline cannot be read; it is monitored without one",
                extra={"model": version.model, "version": version.version, "error": str(error)},
            )
    task = version.metadata.get("task", "")
    if task in (CLASSIFICATION, REGRESSION):
        classifier: bool | None = task == CLASSIFICATION
    elif baseline is not None:
        classifier = baseline.classes is not None
    else:
        classifier = None
    metric = "test_r2" if classifier is False else "test_accuracy"
    test_value = version.metrics.get(metric)
    return VersionInfo(baseline, classifier, test_value)


class VersionCatalog:
    """Each version's VersionInfo, read from the registry (GetVersion, as the version's tenant)
    once and kept; a version the registry could not answer for is asked again after
    VERSION_RETRY_SECONDS."""

    def __init__(
        self, registry: grpc.aio.Channel, token: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry)
        self.token = token
        self.clock = clock
        self._known: dict[tuple[str, str, int], VersionInfo] = {}
        self._unreadable: dict[tuple[str, str, int], float] = {}  # -> when to ask again

    async def get(self, tenant: str, model: str, version: int) -> VersionInfo:
        key = (tenant, model, version)
        if (known := self._known.get(key)) is not None:
            return known
        if self._unreadable.get(key, 0.0) > self.clock():
            return VersionInfo()
        request = registry_pb2.GetVersionRequest(model=model, version=version)
        try:
            answer = await self.registry.GetVersion(
                request, metadata=internal_metadata(self.token, tenant), timeout=REGISTRY_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            log.warning(
                "the registry did not answer for a logged version; summarizing it without a baseline for now",
                extra={"tenant": tenant, "model": model, "version": version, "error": error.code().name},
            )
            self._unreadable[key] = self.clock() + VERSION_RETRY_SECONDS
            return VersionInfo()
        info = version_info(answer.version)
        if len(self._known) >= MAX_VERSIONS:
            del self._known[next(iter(self._known))]
        self._known[key] = info
        self._unreadable.pop(key, None)
        return info


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """A sampled call as the call path hands it over: the messages as they are."""

    tenant: str
    deployment: str
    model: str
    version: int
    request_id: str
    time: float  # seconds since the epoch
    # A maas PredictRequest and the serialized PredictResponse, or an Open Inference Protocol
    # ModelInferRequest and ModelInferResponse.
    request: Any
    response: Any


@dataclass(frozen=True)
class Decoded:
    """A logged call's numeric tensors, samples on the first axis."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        first = next(iter(self.outputs.values()), None)
        return len(first) if first is not None and first.ndim else 0

    def prediction(self, classifier: bool | None) -> float | None:
        """The class index (argmax, or a single logit above 0) or the regressor's value of a
        call of one row, from its first output; None for any other call."""
        first = next(iter(self.outputs.values()), None)
        if first is None or self.rows != 1:
            return None
        values = first.reshape(1, -1)[0].astype(np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            return None
        if classifier is False:
            return float(values[0])
        if values.size > 1:
            return float(np.argmax(values))
        return float(values[0] > 0) if classifier else float(values[0])


def decode(call: LoggedCall) -> Decoded:
    """The numeric tensors of a logged call (BYTES and BF16 ones are left out); ValueError when
    a tensor's bytes do not fit its shape."""
    if isinstance(call.request, inference_pb2.PredictRequest):
        response = inference_pb2.PredictResponse.FromString(call.response)
        return Decoded(_maas_arrays(call.request.inputs), _maas_arrays(response.outputs))
    request, response = call.request, call.response
    return Decoded(
        _oip_arrays(request.inputs, request.raw_input_contents),
        _oip_arrays(response.outputs, response.raw_output_contents),
    )


def _numeric(dtype: str) -> bool:
    return dtype not in ("object", "uint16")  # BYTES; BF16 words are no numbers to numpy


def _maas_arrays(tensors: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for tensor in tensors:
        dtype = BY_PROTO.get(tensor.datatype)
        if dtype is not None and _numeric(dtype.numpy):
            arrays[tensor.name] = np.frombuffer(tensor.raw, dtype=dtype.numpy).reshape(tuple(tensor.shape))
    return arrays


def _oip_arrays(tensors: Any, raw: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for index, tensor in enumerate(tensors):
        dtype = BY_TRITON.get(tensor.datatype)
        if dtype is None or not _numeric(dtype.numpy):
            continue
        shape = tuple(tensor.shape)
        if raw:
            values = np.frombuffer(raw[index], dtype=dtype.numpy)
        else:  # typed contents, as a client may send them
            values = np.asarray(getattr(tensor.contents, TYPED_FIELD[tensor.datatype]), dtype=dtype.numpy)
        arrays[tensor.name] = values.reshape(shape)
    return arrays


def payload_json(arrays: dict[str, np.ndarray]) -> str:
    return json.dumps({name: array.tolist() for name, array in arrays.items()}, separators=(",", ":"))


def bucket_of(seconds: float, bucket_seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds - seconds % bucket_seconds, UTC)


class PredictionLog:
    def __init__(
        self,
        store: MonitoringStore,
        catalog: VersionCatalog,
        *,
        queue_size: int,
        bucket_seconds: int,
        flush_seconds: float,
        refresh_seconds: float,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.bucket_seconds = bucket_seconds
        self.draw = draw
        # This process's rows of the summaries.
        self.writer = secrets.token_hex(8)
        self._queue: asyncio.Queue[LoggedCall] = asyncio.Queue(queue_size)
        # (tenant, deployment) -> its settings, and its sample rate when above 0 (the call path's).
        self._settings: dict[tuple[str, str], LoggingRecord] = {}
        self._rates: dict[tuple[str, str], float] = {}
        # Counted, not yet written: samples, and by bucket what was counted into it since the
        # last flush (the store adds it to the bucket's row: a call counted late, after its
        # bucket was written, adds to it and never replaces it).
        self._samples: list[SampleRecord] = []
        self._counted: dict[tuple[str, str, int, datetime], Summary] = {}
        self._writing = asyncio.Lock()
        # Clear while the recorder holds calls it took off the queue and has not counted yet.
        self._idle = asyncio.Event()
        self._idle.set()
        self._recorder: asyncio.Task[None] | None = None
        self._flushes = Periodic("prediction-log-flush", self.flush, flush_seconds)
        self._refreshes = Periodic("prediction-log-settings", self.refresh, refresh_seconds, wait_first=True)

    # --- the call path -----------------------------------------------------------------------
    def offer(self, tenant: str, deployment: str, model: str, version: int, request: Any, response: Any) -> None:
        """Log this call if its deployment is logged and the draw says so."""
        rate = self._rates.get((tenant, deployment))
        if rate is None or self.draw() >= rate:
            return
        call = LoggedCall(tenant, deployment, model, version, request_id_var.get(), time.time(), request, response)
        try:
            self._queue.put_nowait(call)
        except asyncio.QueueFull:
            QUEUE_FULL.inc()

    # --- settings ----------------------------------------------------------------------------
    def settings_of(self, tenant: str, deployment: str) -> LoggingRecord | None:
        return self._settings.get((tenant, deployment))

    def apply(self, records: list[LoggingRecord]) -> None:
        """Follow these settings (every deployment's, as stored)."""
        self._settings = {(r.tenant, r.deployment): r for r in records}
        self._rates = {key: r.sample_rate for key, r in self._settings.items() if r.sample_rate > 0}

    def changed(self, record: LoggingRecord) -> None:
        """One deployment's settings changed through this process: followed at once here."""
        self.apply([*(r for key, r in self._settings.items() if key != (record.tenant, record.deployment)), record])

    async def refresh(self) -> None:
        self.apply(await asyncio.to_thread(self.store.list_logging))

    # --- the recorder ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._recorder = asyncio.create_task(self._record(), name="prediction-log-recorder")
        self._flushes.start()
        self._refreshes.start()

    async def close(self) -> None:
        await self._refreshes.close()
        await self._flushes.close()
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
        await self.drain()
        with contextlib.suppress(Exception):
            await self.flush()

    async def drain(self) -> None:
        """Count every call offered so far (what a flush then writes): those the recorder holds,
        then those still on the queue."""
        await self._idle.wait()
        while not self._queue.empty():
            await self.count(self._take())

    async def _record(self) -> None:
        while True:
            first = await self._queue.get()
            self._idle.clear()
            try:
                await asyncio.sleep(GATHER_SECONDS)
                await self.count([first, *self._take()])
            except Exception:
                log.exception("counting logged predictions failed; the next ones are counted as planned")
            finally:
                self._idle.set()

    def _take(self) -> list[LoggedCall]:
        """Every call on the queue."""
        taken = []
        while not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    async def count(self, calls: list[LoggedCall]) -> None:
        """Decode the calls, keep their samples and count them into their buckets' summaries."""
        groups: dict[tuple[str, str, int, datetime], list[Decoded]] = {}
        for call in calls:
            try:
                decoded = decode(call)
            except (ValueError, KeyError) as error:
                log.warning(
                    "a logged prediction cannot be decoded; dropped",
                    extra={"tenant": call.tenant, "deployment": call.deployment, "error": str(error)},
                )
                UNDECODABLE.inc()
                continue
            info = await self.catalog.get(call.tenant, call.model, call.version)
            settings = self._settings.get((call.tenant, call.deployment))
            keep = settings is not None and settings.keep_payloads
            self._samples.append(
                SampleRecord(
                    call.tenant,
                    call.deployment,
                    call.version,
                    call.request_id[:128],
                    datetime.fromtimestamp(call.time, UTC),
                    decoded.rows,
                    decoded.prediction(info.classifier),
                    payload_json(decoded.inputs) if keep else None,
                    payload_json(decoded.outputs) if keep else None,
                )
            )
            if info.baseline is not None and decoded.outputs:
                key = (call.tenant, call.deployment, call.version, bucket_of(call.time, self.bucket_seconds))
                groups.setdefault(key, ([], info.baseline))[0].append(decoded)
        for key, (decoded_calls, base) in groups.items():
            if key not in self._counted:
                self._counted[key] = base.empty_like()
            _count_into(self._counted[key], decoded_calls)

    async def flush(self) -> None:
        """Write what was counted since the last flush; kept for the next one if SQL fails."""
        async with self._writing:
            samples, self._samples = self._samples, []
            # Taken whole: what is counted while they are written goes into fresh summaries.
            counted, self._counted = self._counted, {}
            written = [SummaryRecord(*key, summary.samples, summary.to_json()) for key, summary in counted.items()]
            if not samples and not written:
                return
            budgets = {key: settings.byte_budget_per_day for key, settings in self._settings.items()}
            try:
                dropped = await asyncio.to_thread(self.store.write, samples, budgets, written, self.writer)
            except Exception:
                log.exception("writing logged predictions failed; retrying with the next flush")
                # Held for the next flush, as many as the queue holds (the newest).
                waiting = samples + self._samples
                self._samples = waiting[-self._queue.maxsize :]
                WRITE_FAILED.inc(len(waiting) - len(self._samples))
                for key, summary in counted.items():
                    if key in self._counted:
                        summary.absorb(self._counted[key])
                    self._counted[key] = summary
                return
            LOGGED.inc(len(samples))
            OVER_BUDGET.inc(dropped)


def _count_into(window: Summary, calls: list[Decoded]) -> None:
    """Count calls into a summary, as one batch when their tensors stack (a summary's cost is per
    feature and batch, not per row)."""
    try:
        inputs = {name: np.concatenate([c.inputs[name] for c in calls]) for name in calls[0].inputs}
        first_output = next(iter(calls[0].outputs))
        outputs = np.concatenate([c.outputs[first_output] for c in calls])
    except (ValueError, KeyError):  # calls with other shapes or tensors: one at a time
        for call in calls:
            summaries.add_prediction(window, call.inputs, next(iter(call.outputs.values())))
        return
    summaries.add_prediction(window, inputs, outputs)

