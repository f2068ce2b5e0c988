"""`maas deploy ...` (with prediction monitoring: `deploy monitor`, `logs`, `drift`) and `maas predict`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Column, Table
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    JsonOption,
    client,
    console,
    errors,
    fail,
    id_column,
    new_table,
    print_json,
    print_json_list,
)
from maas.client import DEVICES, Client, replica_fields
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.gateway.v1 import monitoring_pb2
from maas.inference.v1 import inference_pb2
from maas.tensors import NUMPY_OF

deploy_app = typer.Typer(help="Deployments onto Triton.", no_args_is_help=True)

# How many of the newest scaling decisions `deploy get` shows.
SCALING_EVENTS_SHOWN = 5

# The scaling options of `deploy create` and `deploy update`: a fixed count, or a range the
# autoscaler keeps the count in.
ReplicasOption = Annotated[
    int | None,
    typer.Option(min=1, help="A fixed number of replicas (min = max); not with --min/--max-replicas"),
]
MinReplicasOption = Annotated[
    int | None, typer.Option(min=0, help="Fewest replicas the autoscaler keeps; 0: scale to zero when idle")
]
MaxReplicasOption = Annotated[
    int | None, typer.Option(min=0, help="Most replicas the autoscaler adds; 0: the same as the minimum")
]
TargetInFlightOption = Annotated[
    int | None,
    typer.Option(min=0, help="Autoscaling target: requests in flight per replica; 0: the service's default"),
]


def _state(value: int) -> str:
    return inference_pb2.DeploymentState.Name(value).removeprefix("DEPLOYMENT_STATE_")


def _scaling(
    replicas: int | None, min_replicas: int | None, max_replicas: int | None, target_in_flight: int | None
) -> dict[str, int]:
    """The scaling options given, as Deployment fields; a usage error when they conflict."""
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise typer.BadParameter(
            "--replicas sets a fixed count (min = max): give it, or --min-replicas/--max-replicas, not both"
        )
    if min_replicas is not None and max_replicas and max_replicas < min_replicas:
        raise typer.BadParameter(f"--max-replicas {max_replicas} is below --min-replicas {min_replicas}")
    return replica_fields(replicas, min_replicas, max_replicas, target_in_flight)


def replica_summary(d: inference_pb2.Deployment) -> str:
    """ "2/3": replicas READY (the canary's not counted) of those the autoscaler wants now."""
    ready = sum(1 for r in d.replicas if r.state == inference_pb2.DEPLOYMENT_STATE_READY and not r.canary)
    return f"{ready}/{d.desired_replicas}"


def scaling_range(d: inference_pb2.Deployment) -> str:
    """ "min 1, max 4, target 8 in flight per replica", with the proto's defaults spelled out."""
    low = d.min_replicas if d.HasField("min_replicas") else 1
    high = d.max_replicas or max(low, 1)
    target = f"{d.target_in_flight}" if d.target_in_flight else "the service's default"
    scale_to_zero = " (scales to zero when idle)" if low == 0 else ""
    return f"min {low}{scale_to_zero}, max {high}, target {target} in flight per replica"


def tier_summary(d: inference_pb2.Deployment) -> str:
    """ "int8", or "fp32; canary v4 distilled": what its requests are priced by (`maas billing`)."""
    if d.HasField("canary") and d.canary.tier:
        return f"{d.tier}; canary v{d.canary.version} {d.canary.tier}"
    return d.tier


def deployment_row(d: inference_pb2.Deployment) -> list[str]:
    target = f"@{d.alias}" if d.HasField("alias") else f"v{d.version}"
    serves = f"{d.model} {target} (serving v{d.resolved_version})"
    if d.HasField("canary"):
        serves += f", canary v{d.canary.version} at {d.canary.weight_percent}% {_state(d.canary.state)}"
    return [
        d.name,
        serves,
        _state(d.state),
        replica_summary(d),
        str(d.instances),
        str(d.max_batch_size),
        d.message,
    ]


@deploy_app.command("create")
def deploy_create(
    name: str,
    model: Annotated[str, typer.Option()],
    version: Annotated[int | None, typer.Option()] = None,
    alias: Annotated[str, typer.Option(help="Follow an alias instead of a fixed version")] = "",
    instances: int = 1,
    max_batch_size: int = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or gpu")] = "auto",
    execution_limit: Annotated[
        int, typer.Option(help="Seconds one request may run in the model (0: the service's default, 30)")
    ] = 0,
    replicas: ReplicasOption = None,
    min_replicas: MinReplicasOption = None,
    max_replicas: MaxReplicasOption = None,
    target_in_flight: TargetInFlightOption = None,
    wait: Annotated[bool, typer.Option(help="Wait until READY")] = True,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Deploy a model version (or alias) onto Triton: --replicas N copies, each on its own node,
    or an autoscaled --min-replicas/--max-replicas range (default: one replica)."""
    if device not in DEVICES:
        raise typer.BadParameter(f"device must be one of {', '.join(DEVICES)}")
    if version is None and not alias:
        raise typer.BadParameter("give --version N or --alias NAME")
    scaling = _scaling(replicas, min_replicas, max_replicas, target_in_flight)
    maas = client(api_key, address)
    try:
        maas.create_deployment(
            name,
            model,
            version=version,
            alias=alias,
            instances=instances,
            max_batch_size=max_batch_size,
            device=device,
            execution_limit_seconds=execution_limit,
            **scaling,
        )
        if wait:
            with console.status(f"loading {name} into Triton ..."):
                deployment = maas.wait_ready(name)
            if deployment.state == inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO:
                console.print(Text.assemble((f"{name} is SCALED_TO_ZERO", "green"), ": its first request loads a replica"))
            else:
                console.print(Text.assemble(
                    (f"{name} is READY", "green"),
                    f" (model {deployment.model} v{deployment.resolved_version}, {replica_summary(deployment)} replicas)",
                ))
        else:
            console.print(f"{name} is loading; `maas deploy get {name}`")
    except ApiError as error:
        raise fail(error) from None
    except (RuntimeError, TimeoutError) as error:
        errors.print(str(error), style="red")
        raise typer.Exit(1) from None


def deployments_table(deployments: list[inference_pb2.Deployment]) -> Table:
    # Short headers fit 80 columns; `deploy get --json` has every field.
    table = new_table(
        id_column("deployment", (d.name for d in deployments)),
        Column("serves", overflow="fold"),  # holds a model name: it folds rather than lose its end
        Column("state", no_wrap=True), Column("replicas", no_wrap=True), Column("inst", no_wrap=True),
        Column("batch", no_wrap=True), "message",
    )
    for d in deployments:
        table.add_row(*deployment_row(d))
    return table


@deploy_app.command("list")
def deploy_list(as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        deployments = client(api_key, address).list_deployments()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(deployments)
        return
    console.print(deployments_table(deployments))


@deploy_app.command("update")
def deploy_update(
    name: str,
    version: Annotated[int | None, typer.Option(help="Roll to this version")] = None,
    alias: Annotated[str | None, typer.Option(help="Follow this alias instead")] = None,
    instances: Annotated[int | None, typer.Option(min=1, help="Model instances per replica")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or gpu")] = None,
    execution_limit: Annotated[
        int | None, typer.Option(min=0, help="Seconds one request may run in the model (0: the default)")
    ] = None,
    replicas: ReplicasOption = None,
    min_replicas: MinReplicasOption = None,
    max_replicas: MaxReplicasOption = None,
    target_in_flight: TargetInFlightOption = None,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Change a deployment; only the options given change. A new version rolls without dropping
    requests; a new replica count or range is applied by the autoscaler."""
    if device is not None and device not in DEVICES:
        raise typer.BadParameter(f"device must be one of {', '.join(DEVICES)}")
    if version is not None and alias is not None:
        raise typer.BadParameter("give --version or --alias, not both")
    scaling = _scaling(replicas, min_replicas, max_replicas, target_in_flight)
    given = {
        "version": version,
        "alias": alias,
        "instances": instances,
        "max_batch_size": max_batch_size,
        "device": None if device is None else DEVICES[device],
        "execution_limit_seconds": execution_limit,
    }
    changes = inference_pb2.Deployment(name=name)
    fields: list[str] = []
    for field, value in given.items():
        if value is not None:
            setattr(changes, field, value)
            fields.append(field)
    if not fields and not scaling:
        raise typer.BadParameter("nothing to change: give at least one option, e.g. --replicas 3")
    _show_change(lambda maas: maas.update_deployment(changes, fields, **scaling), api_key, address)


@deploy_app.command("get")
def deploy_get(
    name: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """A deployment: what it serves, its replicas (node and state), its latest scaling events."""
    try:
        d = client(api_key, address).get_deployment(name)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        if not d.HasField("min_replicas"):
            d.min_replicas = 1  # unset means 1: print the value in effect
        print_json(d)
        return
    _print_deployment(d)
    console.print(f"replicas: {replica_summary(d)} ready; {scaling_range(d)}")
    if d.tier:  # empty from an inference service that predates tiers
        console.print(f"price tier: {tier_summary(d)}")
    if d.replicas:
        versions = [f"v{r.version} (canary)" if r.canary else f"v{r.version}" for r in d.replicas]
        table = new_table(id_column("node", (r.node for r in d.replicas)), id_column("version", versions), "state",
                      "message", title="replicas")
        for r, version in zip(d.replicas, versions, strict=True):
            table.add_row(r.node, version, _state(r.state), r.message)
        console.print(table)
    if d.scaling_events:
        table = new_table("time", "replicas", "reason", title="latest scaling events")
        for event in d.scaling_events[:SCALING_EVENTS_SHOWN]:
            table.add_row(
                event.time.ToJsonString(), f"{event.from_replicas} → {event.to_replicas}", event.reason
            )
        console.print(table)
    for role, specs in (("input", d.signature.inputs), ("output", d.signature.outputs)):
        for spec in specs:
            dtype = common_pb2.DataType.Name(spec.datatype).removeprefix("DATA_TYPE_")
            console.print(f"  {role} {spec.name}: {dtype} [batch, {', '.join(map(str, spec.shape))}]")


@deploy_app.command("delete")
def deploy_delete(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).delete_deployment(name)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"deleted deployment {name}")


@deploy_app.command("canary")
def deploy_canary(
    name: str,
    version: Annotated[int, typer.Option(help="The version to try; same signature as the deployment's")],
    weight: Annotated[int, typer.Option(min=1, max=100, help="Percent of requests it answers")] = 10,
    max_error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Roll back by itself above this failed fraction; 0: never")
    ] = 0.0,
    wait: Annotated[bool, typer.Option(help="Wait until the canary is READY and answering its share")] = True,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Start a canary, or change the weight of the running one."""

    def start(maas: Client) -> inference_pb2.Deployment:
        deployment = maas.start_canary(name, version, weight, max_error_rate)
        if not wait:
            return deployment
        with console.status(f"loading version {version} of {name} into Triton ..."):
            return maas.wait_canary_ready(name)

    _show_change(start, api_key, address)


@deploy_app.command("promote")
def deploy_promote(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """The canary's version becomes the deployment's; no request is dropped."""
    _show_change(lambda maas: maas.promote_canary(name), api_key, address)


@deploy_app.command("rollback")
def deploy_rollback(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Every request back to the deployment's version; the canary is unloaded."""
    _show_change(lambda maas: maas.rollback_canary(name), api_key, address)


def _show_change(
    change: Callable[[Client], inference_pb2.Deployment], api_key: str | None, address: str | None
) -> None:
    try:
        deployment = change(client(api_key, address))
    except ApiError as error:
        raise fail(error) from None
    except (RuntimeError, TimeoutError) as error:
        errors.print(str(error), style="red")
        raise typer.Exit(1) from None
    _print_deployment(deployment)


def _print_deployment(deployment: inference_pb2.Deployment) -> None:
    console.print(deployments_table([deployment]))


@deploy_app.command("load")
def deploy_load(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """What Triton holds and has done for each loaded version: in flight, counts, batch, queue time."""
    try:
        load = client(api_key, address).get_deployment_load(name)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"{load.name}: {load.instances} instance(s), max batch {load.max_batch_size}")
    table = new_table(
        id_column("version", (f"v{v.version}" for v in load.versions)), "pending", "succeeded", "failed",
        "batches", "avg batch", "queue ms", "compute ms",
    )
    for v in load.versions:
        table.add_row(
            f"v{v.version}", str(v.pending_requests), str(v.success_count),
            str(v.failure_count), str(v.execution_count), f"{v.average_batch_size:.2f}",
            f"{v.average_queue_ms:.3f}", f"{v.average_compute_ms:.3f}",
        )
    console.print(table)


def predict(
    deployment: str,
    inputs: Annotated[
        str, typer.Option("--inputs", help='JSON {"name": nested list} or @file.json / @file.npz')
    ],
    request_id: Annotated[
        str, typer.Option(help="Sent as x-request-id: the id a logged prediction takes feedback by")
    ] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Call a deployment. Input dtypes come from its signature; a batch dim is added if missing."""
    maas = client(api_key, address)
    try:
        signature = maas.get_deployment(deployment).signature
        arrays = load_inputs(inputs, signature)
        outputs = maas.predict(deployment, arrays, request_id=request_id)
    except ApiError as error:
        raise fail(error) from None
    print(json.dumps({name: array.tolist() for name, array in outputs.items()}))


def load_inputs(source: str, signature: common_pb2.Signature) -> dict[str, np.ndarray]:
    if source.startswith("@") and source.endswith(".npz"):
        with np.load(source[1:], allow_pickle=False) as data:
            raw = {name: data[name] for name in data.files}
    else:
        text = Path(source[1:]).read_text() if source.startswith("@") else source
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise typer.BadParameter(f"--inputs is not valid JSON: {error}") from None
    arrays = {}
    for spec in signature.inputs:
        if spec.name not in raw:
            raise typer.BadParameter(
                f"--inputs lacks {spec.name!r}; the model takes {[s.name for s in signature.inputs]}"
            )
        array = np.asarray(raw[spec.name], dtype=NUMPY_OF[spec.datatype])
        if array.ndim == len(spec.shape):
            array = array[np.newaxis]
        arrays[spec.name] = array
    return arrays


# --- prediction monitoring ---------------------------------------------------------------------
# Payload JSON shown per sample in `deploy logs`; `--json` has all of it.
PAYLOAD_SHOWN = 40


@deploy_app.command("monitor")
def deploy_monitor(
    name: str,
    sample_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of predictions logged, e.g. 0.01 for 1 %")
    ] = 0.01,
    keep_payloads: Annotated[
        bool, typer.Option(help="Keep the inputs and outputs of logged predictions (`deploy logs`), not only summaries")
    ] = False,
    byte_budget: Annotated[
        int, typer.Option(min=0, help="Most payload bytes kept per UTC day; 0: the gateway's default")
    ] = 0,
    retention_days: Annotated[
        int, typer.Option(min=0, help="Days logged predictions are kept; 0: the gateway's default")
    ] = 0,
    off: Annotated[bool, typer.Option("--off", help="Stop logging (what was logged stays until its retention)")] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Log a sample of a deployment's predictions: summaries for drift (`deploy drift`), the
    predicted class for feedback (`maas feedback`), payloads when kept."""
    try:
        logging = client(api_key, address).set_prediction_logging(
            name, 0.0 if off else sample_rate, keep_payloads=keep_payloads, byte_budget_per_day=byte_budget,
            retention_days=retention_days,
        )
    except ApiError as error:
        raise fail(error) from None
    if not logging.sample_rate:
        console.print(f"{name}: prediction logging is off")
        return
    payloads = (
        f"payloads kept up to {logging.byte_budget_per_day} bytes a day" if logging.keep_payloads else "summaries only"
    )
    console.print(
        f"{name}: logging {logging.sample_rate:.4g} of predictions ({payloads}), kept {logging.retention_days} days"
    )


@deploy_app.command("logs")
def deploy_logs(
    name: str,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many of the newest samples")] = 20,
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """The newest predictions logged with their payloads (`deploy monitor --keep-payloads`)."""
    try:
        samples = client(api_key, address).prediction_samples(name, limit)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(samples)
        return
    if not samples:
        console.print(f"no payloads logged for {name}: `maas deploy monitor {name} --keep-payloads` keeps them")
        return
    # Whole request ids (feedback names them), and a whole header over short ones.
    request_ids = id_column("request id", ["request id", *(s.request_id for s in samples)])
    table = new_table(
        Column("time", no_wrap=True), request_ids, "version", "label",
        Column("inputs", overflow="ellipsis", no_wrap=True), Column("outputs", overflow="ellipsis", no_wrap=True),
    )
    for sample in samples:
        table.add_row(
            sample.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), sample.request_id, f"v{sample.version}",
            f"{sample.label:g}" if sample.HasField("label") else "",
            _shortened(sample.inputs_json), _shortened(sample.outputs_json),
        )
    console.print(table)


def _shortened(payload: str) -> str:
    return payload if len(payload) <= PAYLOAD_SHOWN else payload[: PAYLOAD_SHOWN - 3] + "..."


@deploy_app.command("drift")
def deploy_drift(
    name: str,
    features: Annotated[int, typer.Option(min=0, help="How many of the worst features to list; 0: all")] = 10,
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """The last window of logged predictions against the serving version's training baseline:
    PSI per feature (worst first) and of the outputs, class shares, and live quality from
    feedback beside the version's test-split figure."""
    try:
        drift = client(api_key, address).drift(name)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(drift)
        return
    start, end = drift.window_start.ToDatetime(), drift.window_end.ToDatetime()
    console.print(
        f"{drift.deployment} v{drift.version}: {drift.samples} predictions logged from "
        f"{start:%Y-%m-%d %H:%M} to {end:%H:%M} UTC"
    )
    if not drift.has_baseline:
        console.print(f"v{drift.version} has no baseline (only versions the trainer made have one): no PSI")
    else:
        console.print(_verdict(drift))
        shown = list(drift.features) if not features else list(drift.features)[:features]
        table = new_table(id_column("feature", ["outputs", *(f.feature for f in shown)]), "PSI", "")
        for feature, psi in (("outputs", drift.output_psi), *((f.feature, f.psi) for f in shown)):
            table.add_row(feature, f"{psi:.3f}", _flag(psi, drift.threshold))
        console.print(table)
        if drift.classes:
            classes = new_table("class", "baseline", "window", "change", title="predicted class shares")
            for shift in drift.classes:
                change = shift.window_share - shift.baseline_share
                classes.add_row(
                    str(shift.class_index), f"{shift.baseline_share:.1%}", f"{shift.window_share:.1%}", f"{change:+.1%}"
                )
            console.print(classes)
    console.print(_live_quality(drift.live))


def _verdict(drift: monitoring_pb2.GetDriftResponse) -> Text:
    worst = max([("outputs", drift.output_psi), *((f.feature, f.psi) for f in drift.features)], key=lambda w: w[1])
    if drift.drifted:
        return Text.assemble(("DRIFTED", "red"), f": {worst[0]} PSI {worst[1]:.3f} >= {drift.threshold:g}")
    return Text.assemble(("no drift", "green"), f": worst PSI {worst[1]:.3f} ({worst[0]}) < {drift.threshold:g}")


def _flag(psi: float, threshold: float) -> Text:
    if psi >= threshold:
        return Text("drifted", "red")
    return Text("watch", "yellow") if psi >= threshold / 2 else Text("")


def _live_quality(live: monitoring_pb2.LiveQuality) -> str:
    test = f" (test split: {live.test_value:.3f})" if live.HasField("test_value") else ""
    if not live.labelled:
        return f"live {live.metric}: no feedback yet{test}; `maas feedback DEPLOYMENT --labels FILE` sends labels"
    return f"live {live.metric}: {live.value:.3f} on {live.labelled} labelled predictions{test}"
