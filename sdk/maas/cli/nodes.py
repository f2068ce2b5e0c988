"""`maas nodes ...`: the Triton nodes that replicas are placed on (platform admin key)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    JsonOption,
    ago,
    client,
    console,
    errors,
    fail,
    id_column,
    new_table,
    print_json_list,
)
from maas.errors import ApiError
from maas.inference.v1 import inference_pb2

nodes_app = typer.Typer(
    help="The serving fleet: Triton nodes, their state and capacity; drain one for maintenance.",
    no_args_is_help=True,
)

# What follows a node's name and address (id columns, sized to the names and addresses shown).
NODE_COLUMNS = ("state", "replicas", "free / slots", "free / memory MB", "GPUs", "last contact", "message")
STATE_STYLE = {"READY": "green", "DRAINING": "yellow", "DOWN": "red"}


def node_state(value: int) -> str:
    return inference_pb2.NodeState.Name(value).removeprefix("NODE_STATE_")


def node_row(node: inference_pb2.Node) -> list[str]:
    state = node_state(node.state)
    style = STATE_STYLE.get(state)
    return [
        node.name,
        node.address,
        Text(state, style=style or ""),
        str(node.replicas),
        f"{node.free_slots} / {node.model_slots}",
        f"{node.free_memory_mb:,} / {node.memory_mb:,}",
        str(node.gpus),
        ago(node.last_contact),
        node.message,
    ]


def _print_nodes(nodes: list[inference_pb2.Node]) -> None:
    table = new_table(
        id_column("node", (n.name for n in nodes)), id_column("address", (n.address for n in nodes)), *NODE_COLUMNS
    )
    for node in nodes:
        table.add_row(*node_row(node))
    console.print(table)


@nodes_app.command("list")
def nodes_list(as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Every node: state (READY, DRAINING, DOWN), replicas, free slots and memory, last contact."""
    try:
        nodes = client(api_key, address).list_nodes()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(nodes)
        return
    _print_nodes(nodes)


@nodes_app.command("drain")
def nodes_drain(
    node: str,
    wait: Annotated[bool, typer.Option(help="Wait until its last replica has moved away")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits")] = 600.0,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Move the node's replicas to other nodes (each is ready elsewhere before it leaves this
    one), then keep the node out of placement until `maas nodes resume`."""
    maas = client(api_key, address)
    try:
        drained = maas.drain_node(node)
        if wait:
            deadline = time.monotonic() + timeout
            with console.status(f"moving the replicas of {node} ...") as status:
                while drained.replicas and time.monotonic() < deadline:
                    status.update(f"moving the replicas of {node}: {drained.replicas} left ...")
                    time.sleep(0.5)
                    drained = next((n for n in maas.list_nodes() if n.name == node), drained)
            if drained.replicas:
                errors.print(f"{node} still holds {drained.replicas} replica(s) after {timeout:.0f}s", style="red")
                _print_nodes([drained])
                raise typer.Exit(1)
    except ApiError as error:
        raise fail(error) from None
    _print_nodes([drained])
    console.print(f"{node} takes no new replicas; `maas nodes resume {node}` puts it back")


@nodes_app.command("resume")
def nodes_resume(node: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Put a drained node back into placement."""
    try:
        resumed = client(api_key, address).resume_node(node)
    except ApiError as error:
        raise fail(error) from None
    _print_nodes([resumed])
