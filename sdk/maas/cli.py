"""The `maas` command line: run the local stack, manage tenants and keys, upload, deploy, predict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from maas.client import DEVICES, FORMATS, ROLES, Client
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2
from maas.tensors import NUMPY_OF, datatype

app = typer.Typer(help="Model-as-a-Service: register, deploy and call models on Triton.", no_args_is_help=True)
admin_app = typer.Typer(help="Tenants and API keys (admin key needed).", no_args_is_help=True)
models_app = typer.Typer(help="Models and their versions in the registry.", no_args_is_help=True)
deploy_app = typer.Typer(help="Deployments onto Triton.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
app.add_typer(models_app, name="models")
app.add_typer(deploy_app, name="deploy")
console = Console()
errors = Console(stderr=True)

ApiKeyOption = Annotated[
    Optional[str], typer.Option("--api-key", envvar="MAAS_API_KEY", help="Defaults to $MAAS_HOME/admin.key")
]
AddressOption = Annotated[Optional[str], typer.Option("--address", envvar="MAAS_GATEWAY_ADDR", help="Gateway host:port")]


def maas_home() -> Path:
    """$MAAS_HOME, else .maas/ in the repository this CLI was installed from (else the current folder)."""
    if home := os.environ.get("MAAS_HOME"):
        return Path(home).expanduser().resolve()
    try:
        from services.common.settings import default_home
    except ImportError:  # the SDK installed on its own, without the services
        return Path.cwd() / ".maas"
    return default_home()


def client(api_key: str | None, address: str | None) -> Client:
    if not api_key:
        key_file = maas_home() / "admin.key"
        if key_file.exists():
            api_key = key_file.read_text().strip()
    if not api_key:
        errors.print("[red]no API key:[/] pass --api-key, set MAAS_API_KEY, or run `maas up` to create the admin key")
        raise typer.Exit(2)
    return Client(address, api_key)


def fail(error: ApiError) -> typer.Exit:
    errors.print(f"[red]{error.code.name}[/]: {error.details}")
    return typer.Exit(1)


def parse_specs(values: list[str], role: str) -> list[common_pb2.TensorSpec]:
    """"x:FP32:64" or "image:FP32:1,8,8" (shape without the batch dim; -1 for any size)."""
    specs = []
    for value in values:
        parts = value.split(":")
        if len(parts) != 3:
            raise typer.BadParameter(f"{role} {value!r}: write NAME:DATATYPE:DIM[,DIM...], e.g. x:FP32:64")
        name, dtype, dims = parts
        try:
            shape = [int(d) for d in dims.split(",") if d]
            specs.append(common_pb2.TensorSpec(name=name, datatype=datatype(dtype), shape=shape))
        except ValueError as error:
            raise typer.BadParameter(f"{role} {value!r}: {error}") from None
    return specs


# --- the local stack ---------------------------------------------------------------------------
def read_state() -> dict | None:
    state_file = maas_home() / "run" / "stack.json"
    try:
        return json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command()
def up(detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background")] = False) -> None:
    """Start redis-server, registry, trainer, inference (with Triton) and gateway."""
    state = read_state()
    if state and pid_alive(state.get("supervisor_pid")):
        console.print(f"the stack is already running (supervisor pid {state['supervisor_pid']}); `maas status`")
        return
    command = [sys.executable, "-m", "services.stack"]
    if not detach:
        os.execv(sys.executable, command)
    home = maas_home()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    log_path = home / "logs" / "supervisor.log"
    with log_path.open("ab") as log_file:
        supervisor = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
    started = time.monotonic()
    with console.status("starting redis, registry, trainer, inference + Triton, gateway ...") as status:
        while True:
            state = read_state() or {}
            if state.get("supervisor_pid") == supervisor.pid and state.get("state") == "ready":
                break
            if supervisor.poll() is not None or state.get("state") == "failed":
                errors.print(f"[red]the stack failed to start[/]: {state.get('error') or 'see ' + str(log_path)}")
                raise typer.Exit(1)
            starting = [n for n, c in state.get("children", {}).items() if c.get("pid")]
            if starting:
                status.update(f"starting ... {', '.join(starting)} ({time.monotonic() - started:.0f}s)")
            time.sleep(0.3)
    print_banner(time.monotonic() - started)


def print_banner(elapsed: float) -> None:
    home = maas_home()
    address = os.environ.get("MAAS_GATEWAY_ADDR", "127.0.0.1:50051")
    console.print(f"[green]MaaS is up[/] in {elapsed:.1f}s. Gateway: [bold]{address}[/]")
    console.print(f"Admin key: {home / 'admin.key'} (mode 0600). Logs: {home / 'logs'}")
    console.print("Try: [bold]maas whoami[/]  then  [bold]maas admin tenant create my-team[/]")


@app.command()
def down() -> None:
    """Stop every process `maas up` started."""
    state = read_state()
    if not state:
        console.print("the stack is not running")
        return
    pid = state.get("supervisor_pid")
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        with console.status("stopping ..."):
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
    # A supervisor that was killed leaves its children: stop them too.
    for name, child in state.get("children", {}).items():
        if pid_alive(child.get("pid")) and child.get("pid") != pid:
            os.kill(child["pid"], signal.SIGTERM)
    (maas_home() / "run" / "stack.json").unlink(missing_ok=True)
    console.print("stopped")


@app.command()
def status() -> None:
    """Health of every process of the local stack."""
    from services.stack.supervisor import grpc_serving, redis_ready

    state = read_state()
    if not state:
        console.print("the stack is not running (`maas up --detach` starts it)")
        raise typer.Exit(1)
    table = Table("service", "address", "pid", "health")
    all_ok = True
    for name, child in state.get("children", {}).items():
        check = redis_ready if name == "redis" else grpc_serving
        ok = pid_alive(child.get("pid")) and check(child["address"])
        all_ok &= ok
        table.add_row(name, child["address"], str(child.get("pid") or "-"), "[green]SERVING[/]" if ok else "[red]DOWN[/]")
    console.print(f"stack: {state.get('state')} (supervisor pid {state.get('supervisor_pid')})")
    console.print(table)
    if not all_ok:
        raise typer.Exit(1)


# --- admin -------------------------------------------------------------------------------------
@app.command()
def whoami(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Show the tenant and role of the API key in use."""
    try:
        key = client(api_key, address).whoami()
    except ApiError as error:
        raise fail(error)
    role = {v: k for k, v in ROLES.items()}.get(key.role, "?")
    console.print(f"key {key.id}: tenant [bold]{key.tenant}[/], role {role}")


tenant_app = typer.Typer(help="Tenants.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(key_app, name="key")


@tenant_app.command("create")
def tenant_create(name: str, display_name: str = "", api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        tenant = client(api_key, address).create_tenant(name, display_name)
    except ApiError as error:
        raise fail(error)
    console.print(f"created tenant [bold]{tenant.name}[/]")


@tenant_app.command("list")
def tenant_list(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        tenants = client(api_key, address).list_tenants()
    except ApiError as error:
        raise fail(error)
    table = Table("tenant", "display name", "created")
    for tenant in tenants:
        table.add_row(tenant.name, tenant.display_name, tenant.create_time.ToJsonString())
    console.print(table)


@key_app.command("create")
def key_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for")],
    role: Annotated[str, typer.Option(help="reader, developer or admin")] = "developer",
    description: str = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Create a key; the plaintext is printed once and never stored."""
    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}")
    try:
        record, plaintext = client(api_key, address).create_api_key(tenant, role, description)
    except ApiError as error:
        raise fail(error)
    errors.print(f"key {record.id} for tenant {record.tenant} ({role}); store it now, it is not shown again:")
    print(plaintext)


@key_app.command("list")
def key_list(tenant: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        keys = client(api_key, address).list_api_keys(tenant)
    except ApiError as error:
        raise fail(error)
    roles = {v: k for k, v in ROLES.items()}
    table = Table("id", "role", "revoked", "description", "created")
    for key in keys:
        table.add_row(key.id, roles.get(key.role, "?"), "yes" if key.revoked else "", key.description,
                      key.create_time.ToJsonString())
    console.print(table)


@key_app.command("revoke")
def key_revoke(key_id: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).revoke_api_key(key_id)
    except ApiError as error:
        raise fail(error)
    console.print(f"revoked {key_id}")


# --- models ------------------------------------------------------------------------------------
@models_app.command("create")
def model_create(name: str, description: str = "", api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).create_model(name, description)
    except ApiError as error:
        raise fail(error)
    console.print(f"created model [bold]{name}[/]")


@models_app.command("list")
def model_list(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        models = client(api_key, address).list_models()
    except ApiError as error:
        raise fail(error)
    table = Table("model", "latest version", "aliases", "description")
    for model in models:
        aliases = ", ".join(f"{k}→{v}" for k, v in sorted(model.aliases.items()))
        table.add_row(model.name, str(model.latest_version or "-"), aliases, model.description)
    console.print(table)


@models_app.command("upload")
def model_upload(
    model: str,
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    format: Annotated[str, typer.Option(help="torchscript or onnx")] = "torchscript",
    input: Annotated[list[str], typer.Option("--input", help="NAME:DATATYPE:DIMS, e.g. x:FP32:64")] = [],
    output: Annotated[list[str], typer.Option("--output", help="NAME:DATATYPE:DIMS, e.g. logits:FP32:10")] = [],
    alias: Annotated[str, typer.Option(help="Point this alias at the new version")] = "",
    create: Annotated[bool, typer.Option(help="Create the model if it does not exist")] = True,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Upload a TorchScript or ONNX artifact as a new version (streamed, checked by sha256)."""
    if format.lower() not in FORMATS:
        raise typer.BadParameter(f"format must be one of {', '.join(FORMATS)}")
    signature = common_pb2.Signature(inputs=parse_specs(input, "input"), outputs=parse_specs(output, "output"))
    maas = client(api_key, address)
    try:
        if create:
            try:
                maas.create_model(model)
            except ApiError as error:
                if error.code.name != "ALREADY_EXISTS":
                    raise
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=errors) as progress:
            task = progress.add_task(f"uploading {artifact.name}", total=artifact.stat().st_size)
            version = maas.upload_version(model, artifact, format=format, signature=signature,
                                          progress=lambda n: progress.advance(task, n))
        if alias:
            maas.set_alias(model, alias, version.version)
    except ApiError as error:
        raise fail(error)
    console.print(f"{model} version [bold]{version.version}[/] ready (sha256 {version.sha256[:12]}…, "
                  f"{version.size_bytes} bytes){f', alias {alias}' if alias else ''}")


@models_app.command("versions")
def model_versions(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        versions = client(api_key, address).list_versions(model)
    except ApiError as error:
        raise fail(error)
    formats = {v: k for k, v in FORMATS.items()}
    table = Table("version", "format", "precision", "size", "state", "sha256", "created")
    for v in versions:
        table.add_row(str(v.version), formats.get(v.format, "?"), v.precision, f"{v.size_bytes:,}",
                      registry_pb2.VersionState.Name(v.state).removeprefix("VERSION_STATE_").lower(),
                      v.sha256[:12], v.create_time.ToJsonString())
    console.print(table)


@models_app.command("alias")
def model_alias(model: str, alias: str, version: int, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Point ALIAS (e.g. production) at VERSION."""
    try:
        client(api_key, address).set_alias(model, alias, version)
    except ApiError as error:
        raise fail(error)
    console.print(f"{model}@{alias} → {version}")


@models_app.command("download")
def model_download(model: str, version: int, output: Annotated[Path, typer.Option("-o", "--output")],
                   api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        record = client(api_key, address).download_version(model, version, output)
    except ApiError as error:
        raise fail(error)
    console.print(f"wrote {output} ({record.size_bytes} bytes)")


@models_app.command("delete")
def model_delete(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).delete_model(model)
    except ApiError as error:
        raise fail(error)
    console.print(f"deleted {model}")


# --- deployments -------------------------------------------------------------------------------
def deployment_row(d: inference_pb2.Deployment) -> list[str]:
    target = f"@{d.alias}" if d.HasField("alias") else f"v{d.version}"
    state = inference_pb2.DeploymentState.Name(d.state).removeprefix("DEPLOYMENT_STATE_")
    return [d.name, f"{d.model} {target} (serving v{d.resolved_version})", state, str(d.instances),
            str(d.max_batch_size), d.message]


@deploy_app.command("create")
def deploy_create(
    name: str,
    model: Annotated[str, typer.Option()],
    version: Annotated[Optional[int], typer.Option()] = None,
    alias: Annotated[str, typer.Option(help="Follow an alias instead of a fixed version")] = "",
    instances: int = 1,
    max_batch_size: int = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or gpu")] = "auto",
    wait: Annotated[bool, typer.Option(help="Wait until READY")] = True,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Deploy a model version (or alias) onto Triton."""
    if device not in DEVICES:
        raise typer.BadParameter(f"device must be one of {', '.join(DEVICES)}")
    if version is None and not alias:
        raise typer.BadParameter("give --version N or --alias NAME")
    maas = client(api_key, address)
    try:
        maas.create_deployment(name, model, version=version, alias=alias, instances=instances,
                               max_batch_size=max_batch_size, device=device)
        if wait:
            with console.status(f"loading {name} into Triton ..."):
                deployment = maas.wait_ready(name)
            console.print(f"[green]{name} is READY[/] (model {deployment.model} v{deployment.resolved_version})")
        else:
            console.print(f"{name} is loading; `maas deploy get {name}`")
    except ApiError as error:
        raise fail(error)
    except (RuntimeError, TimeoutError) as error:
        errors.print(f"[red]{error}[/]")
        raise typer.Exit(1)


@deploy_app.command("list")
def deploy_list(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        deployments = client(api_key, address).list_deployments()
    except ApiError as error:
        raise fail(error)
    table = Table("deployment", "serves", "state", "instances", "max batch", "message")
    for d in deployments:
        table.add_row(*deployment_row(d))
    console.print(table)


@deploy_app.command("get")
def deploy_get(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        d = client(api_key, address).get_deployment(name)
    except ApiError as error:
        raise fail(error)
    table = Table("deployment", "serves", "state", "instances", "max batch", "message")
    table.add_row(*deployment_row(d))
    console.print(table)
    for role, specs in (("input", d.signature.inputs), ("output", d.signature.outputs)):
        for spec in specs:
            dtype = common_pb2.DataType.Name(spec.datatype).removeprefix("DATA_TYPE_")
            console.print(f"  {role} {spec.name}: {dtype} [batch, {', '.join(map(str, spec.shape))}]", markup=False)


@deploy_app.command("delete")
def deploy_delete(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).delete_deployment(name)
    except ApiError as error:
        raise fail(error)
    console.print(f"deleted deployment {name}")


@app.command()
def predict(
    deployment: str,
    inputs: Annotated[str, typer.Option("--inputs", help='JSON {"name": nested list} or @file.json / @file.npz')],
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Call a deployment. Input dtypes come from its signature; a batch dim is added if missing."""
    maas = client(api_key, address)
    try:
        signature = maas.get_deployment(deployment).signature
        arrays = load_inputs(inputs, signature)
        outputs = maas.predict(deployment, arrays)
    except ApiError as error:
        raise fail(error)
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
            raise typer.BadParameter(f"--inputs lacks {spec.name!r}; the model takes {[s.name for s in signature.inputs]}")
        array = np.asarray(raw[spec.name], dtype=NUMPY_OF[spec.datatype])
        if array.ndim == len(spec.shape):
            array = array[np.newaxis]
        arrays[spec.name] = array
    return arrays


def main() -> None:
    app()
