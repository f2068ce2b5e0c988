"""EphemeralStack's ports: probed free, but nothing holds them until the stack starts, so they
must not collide with each other or with the block the embedded Triton nodes take."""

from __future__ import annotations

import itertools

from services.stack import ephemeral
from services.stack.ephemeral import MAX_TRITON_NODES, PORT_SETTINGS, EphemeralStack


def test_free_ports_skip_ports_inside_the_excluded_block_and_repeats(monkeypatch) -> None:
    probes = iter([41001, 41001, 30000, 41002, 30001, 41003])
    monkeypatch.setattr(ephemeral, "free_port", lambda: next(probes))
    assert ephemeral.free_ports(3, excluding=range(30000, 30024)) == [41001, 41002, 41003]


def test_a_stacks_ports_are_all_different_and_outside_the_triton_block(monkeypatch) -> None:
    # The block is fixed and the probes offer its ports first: the failure CI once met, where
    # the registry took a port that a Triton node then could not bind.
    monkeypatch.setattr(ephemeral, "free_port_block", lambda count: 30000)
    probes = itertools.chain([30004, 30013], itertools.count(42000))
    monkeypatch.setattr(ephemeral, "free_port", lambda: next(probes))
    stack = EphemeralStack()
    try:
        ports = [int(stack.env[name].rsplit(":", 1)[1]) for name in PORT_SETTINGS]
        ports.append(int(stack.env["MAAS_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]))
        assert len(set(ports)) == len(ports)
        assert not set(ports) & set(range(30000, 30000 + 3 * MAX_TRITON_NODES))
    finally:
        stack._tempdir.cleanup()  # type: ignore[union-attr]
