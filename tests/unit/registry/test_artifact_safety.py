"""Upload-time safety of artifacts (issue 11): TorchScript operators on an allowlist, pickles scanned
opcode by opcode, ONNX standard domains only and no external data.

Attack models are built here with torch; the operator check loads each in its own process
(forked from a zygote that imported torch once), so refusals that the registry can prove without
torch are tested with the operator check off.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import pickletools
import signal
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List  # noqa: UP035 (TorchScript needs typing.List)

import grpc
import onnx
import pytest
import torch
from maas.common.v1 import common_pb2
from onnx import TensorProto, helper
from torch import nn

from services.common.errors import InvalidArgument
from services.registry import torchscript_ops
from services.registry.artifacts import check_onnx, check_onnx_contents, check_torchscript
from services.registry.config import RegistrySettings
from services.trainer.models import Cnn, Exported, Mlp, Standardize
from services.trainer.optimization import quantize
from tests.unit.registry.conftest import TenantStub, expect_status, make_onnx

# Helpers compiled into the attack models


def decode(path: torch.Tensor) -> str:
    """A file name sent to the model as a UINT8 tensor, as the attacker's client did."""
    codes: List[int] = path.tolist()  # noqa: UP006 (TorchScript needs typing.List here)
    return "".join([chr(code) for code in codes])


class FileReader(nn.Module):
    """The attack of issue 11: forward returns the bytes of any file the server can read."""

    def forward(self, path: torch.Tensor) -> torch.Tensor:
        return torch.from_file(decode(path), shared=False, size=62, dtype=torch.uint8)


class HidingHelper(nn.Module):
    @torch.jit.export
    def read(self, path: torch.Tensor) -> torch.Tensor:
        return torch.from_file(decode(path), shared=False, size=62, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HiddenInSubmodule(nn.Module):
    """forward looks harmless; the read hides in a submodule's helper method."""

    def __init__(self) -> None:
        super().__init__()
        self.helper = HidingHelper()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() < 0:
            return self.helper.read(x)
        return x * 2


class UncalledMethod(nn.Module):
    """No path from forward reaches the read: a runner could still call the exported method."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1

    @torch.jit.export
    def steal(self, path: torch.Tensor) -> torch.Tensor:
        return torch.from_file(decode(path), shared=False, size=62, dtype=torch.uint8)


class Writer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, "out.pt")
        return x


class FakeVerdict(nn.Module):
    """Its __setstate__ runs while the checker loads it and prints a verdict saying "all fine"."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.ones(1)

    def forward(self, path: torch.Tensor) -> torch.Tensor:
        return torch.from_file(decode(path), shared=False, size=62, dtype=torch.uint8) * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print('{"refused": []}')
        self.weight = state[0]
        self.training = state[1]


class SpinsWhileLoading(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.ones(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        total = 0
        while total >= 0:
            total = (total + 1) % 1000
        self.weight = state[0]
        self.training = state[1]


torch.library.define("maas_test::leak", "(Tensor x) -> Tensor")


@torch.library.impl("maas_test::leak", "cpu")
def _leak(x: torch.Tensor) -> torch.Tensor:
    return x


class CustomOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.maas_test.leak(x)


def saved(module: nn.Module | torch.jit.ScriptModule, tmp_path: Path, name: str = "model.pt") -> Path:
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still writes it
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        torch.jit.save(scripted, str(path))
    return path


def zip_with(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "upload.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def standardized(net: nn.Module, shape: tuple[int, ...]) -> Exported:
    x = torch.randn(32, *shape)
    return Exported(net, Standardize(x.mean(0), x.std(0)), torch.zeros(()), torch.ones(())).eval()


# TorchScript operators


@pytest.mark.parametrize(
    "module, where",
    [
        (FileReader(), "FileReader.forward"),
        (HiddenInSubmodule(), "HidingHelper.read"),
        (UncalledMethod(), "UncalledMethod.steal"),
    ],
    ids=["forward", "submodule-helper", "uncalled-method"],
)
def test_file_reading_models_are_refused_naming_the_operator(module, where, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=rf"aten::from_file in [\w.]*{where}"):
        check_torchscript(saved(module, tmp_path))


def test_a_model_that_writes_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"aten::save in [\w.]*Writer.forward"):
        check_torchscript(saved(Writer(), tmp_path))


def test_a_custom_operator_is_refused_by_name(tmp_path: Path) -> None:
    path = saved(CustomOp(), tmp_path)
    with pytest.raises(InvalidArgument, match="custom operator maas_test::leak"):
        check_torchscript(path)
    # The subprocess alone refuses it too (torch cannot resolve the op there): fail closed.
    with pytest.raises(InvalidArgument, match="cannot be loaded by torch.jit.load"):
        torchscript_ops.check_operators(path)


def test_a_printed_fake_verdict_does_not_pass(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="aten::from_file"):
        check_torchscript(saved(FakeVerdict(), tmp_path))


def test_a_model_that_spins_while_loading_is_stopped(tmp_path: Path) -> None:
    path = saved(SpinsWhileLoading(), tmp_path)
    with pytest.raises(InvalidArgument, match="took longer than 6 s"):
        torchscript_ops.check_operators(path, timeout_s=6)


def test_a_checker_past_its_memory_cap_is_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Below torch's own footprint: the checker is over it as soon as it runs.
    monkeypatch.setattr(torchscript_ops, "CHECK_BASE_MEMORY_BYTES", 64 * 1024 * 1024)
    with pytest.raises(InvalidArgument, match="used more than 64 MiB"):
        torchscript_ops.check_operators(saved(nn.Linear(4, 2), tmp_path))


def outcome_of(path: Path) -> str:
    try:
        torchscript_ops.check_operators(path)
    except InvalidArgument as error:
        return str(error)
    return "passed"


def test_concurrent_checks_each_get_their_own_verdict(tmp_path: Path) -> None:
    """One zygote forks a checker per check: answers go back to the check that asked."""
    paths = [saved(nn.Linear(4, 2), tmp_path, "safe.pt"), saved(FileReader(), tmp_path, "reader.pt")] * 3
    with ThreadPoolExecutor(len(paths)) as pool:
        outcomes = list(pool.map(outcome_of, paths))
    assert outcomes[::2] == ["passed"] * 3
    assert all("aten::from_file" in outcome for outcome in outcomes[1::2])


def test_a_zygote_that_died_is_replaced(tmp_path: Path) -> None:
    path = saved(nn.Linear(4, 2), tmp_path)
    torchscript_ops.warm_up()
    process = torchscript_ops._ZYGOTE._process
    assert process is not None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert outcome_of(path) == "passed"


def test_the_zygote_goes_when_no_check_needs_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torchscript_ops, "ZYGOTE_IDLE_S", 0.5)
    torchscript_ops.warm_up()
    process = torchscript_ops._ZYGOTE._process
    assert process is not None
    assert process.wait(timeout=30) == 0
    assert outcome_of(saved(nn.Linear(4, 2), tmp_path)) == "passed"  # a new one starts


def test_the_platforms_own_models_pass(tmp_path: Path) -> None:
    """An MLP and a CNN as the trainer builds them, the int8 and fp16 tiers of the optimizer, a
    traced module: all in one archive each, checked one after the other."""
    mlp = standardized(Mlp(16, 3, [8], 0.1), (16,))
    cnn = standardized(Cnn((8, 8), 10, [4], 8, 0.1), (8, 8))
    traced = torch.jit.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(2, 4))
    models = {
        "mlp": mlp,
        "cnn": cnn,
        "mlp_int8": quantize(copy.deepcopy(mlp), "int8"),
        "mlp_fp16": quantize(copy.deepcopy(mlp), "fp16"),
        "traced": traced,
    }
    for name, model in models.items():
        check_torchscript(saved(model, tmp_path, f"{name}.pt"))


def test_the_checker_gets_no_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAAS_INTERNAL_TOKEN", "secret")
    environment = torchscript_ops._checker_environment(str(tmp_path))
    assert not [key for key in environment if key.startswith("MAAS_") or "TOKEN" in key]
    assert environment["HOME"] == str(tmp_path)


@pytest.mark.parametrize(
    "output",
    ["", "garbage", '{"refused": "none"}', '{"refused": []}\nnot json', '{"refused": [{"operator": 1}]}'],
)
def test_a_verdict_that_is_not_one_fails_closed(output: str) -> None:
    with pytest.raises(InvalidArgument, match="no verdict"):
        torchscript_ops._parse_verdict(output)


# Pickles


def checkpoint_with_code(tmp_path: Path) -> Path:
    """The issue's artifact: a torch.save checkpoint with an empty archive/code/__torch__.py added."""
    buffer = io.BytesIO()
    torch.save(nn.Linear(4, 2).state_dict(), buffer)
    with zipfile.ZipFile(buffer) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    root = next(iter(members)).split("/")[0]
    return zip_with(tmp_path, {**members, f"{root}/code/__torch__.py": b""})


def test_a_torch_save_checkpoint_with_a_code_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="torch.save checkpoint with code files added"):
        check_torchscript(checkpoint_with_code(tmp_path), check_operators=False)


class Shell:
    def __reduce__(self):
        return (os.system, ("echo owned",))


class Eval:
    def __reduce__(self):
        return (eval, ("1",))


def pickle_of(payload: object, protocol: int) -> bytes:
    return pickle.dumps(payload, protocol=protocol)


def inst_pickle() -> bytes:
    """Protocol 0's INST opcode: a class by name without GLOBAL."""
    return b"(S'echo owned'\nios\nsystem\n."


@pytest.mark.parametrize(
    "member, data, named",
    [
        ("data.pkl", pickle_of(Shell(), 2), "global posix.system"),  # os.system pickles as posix.system
        ("data.pkl", pickle_of(Shell(), 4), "global posix.system"),  # STACK_GLOBAL
        ("constants.pkl", pickle_of(Eval(), 2), "global __builtin__.eval"),  # protocol 2 names Python 2's module
        ("code/__torch__.py.debug_pkl", pickle_of(Eval(), 4), "global builtins.eval"),
        ("data.pkl", inst_pickle(), "opcode INST"),
    ],
    ids=["os.system", "os.system-protocol-4", "eval-in-constants", "eval-in-debug-pkl", "inst"],
)
def test_pickles_naming_other_globals_are_refused(tmp_path: Path, member: str, data: bytes, named: str) -> None:
    """A TorchScript-shaped archive (a real one, one pickle replaced) with no code that would run:
    refused with the global named, and without anything unpickled here."""
    members = members_of(saved(nn.Linear(4, 2), tmp_path))
    root = next(iter(members)).split("/")[0]
    members[f"{root}/{member}"] = data
    with pytest.raises(InvalidArgument, match=rf"{member} (names the|uses the pickle) {named}"):
        check_torchscript(zip_with(tmp_path, members), check_operators=False)


def test_a_stack_global_whose_name_comes_from_the_memo_is_refused(tmp_path: Path) -> None:
    # "posix" and "system" memoized, then fetched back for STACK_GLOBAL: no plain name to check.
    data = b"\x80\x04\x8c\x05posix\x940\x8c\x06system\x940h\x00h\x01\x93\x8c\x02id\x85R."
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle
    members = members_of(saved(nn.Linear(4, 2), tmp_path))
    root = next(iter(members)).split("/")[0]
    members[f"{root}/data.pkl"] = data
    with pytest.raises(InvalidArgument, match="does not name plainly"):
        check_torchscript(zip_with(tmp_path, members), check_operators=False)


# ONNX


def onnx_file(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def linear_graph(node: onnx.NodeProto, initializer: list[onnx.TensorProto] | None = None) -> onnx.GraphProto:
    return helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=initializer or [],
    )


def test_onnx_custom_domain_node_is_refused(tmp_path: Path) -> None:
    model = helper.make_model(
        linear_graph(helper.make_node("Leak", ["x"], ["y"], domain="com.attacker")),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.attacker", 1)],
    )
    with pytest.raises(InvalidArgument, match="operator set 'com.attacker'"):
        check_onnx(onnx_file(tmp_path, model))
    del model.opset_import[1]  # the node alone, without the import
    with pytest.raises(InvalidArgument, match="operator com.attacker.Leak from a custom domain"):
        check_onnx_contents(model)


def test_onnx_custom_node_inside_a_subgraph_is_refused() -> None:
    branch = helper.make_graph(
        [helper.make_node("Leak", ["x"], ["z"], domain="com.attacker")],
        "branch", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 4])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    model = helper.make_model(linear_graph(node), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidArgument, match="com.attacker.Leak"):
        check_onnx_contents(model)


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    # raw bytes: the external-data converter moves only raw_data tensors out of the file
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 4], bytes(64), raw=True)
    model = helper.make_model(
        linear_graph(helper.make_node("MatMul", ["x", "W"], ["y"]), [weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="../../admin.key", size_threshold=0
    )
    with pytest.raises(InvalidArgument, match=r"initializer 'W' of the graph keeps its data in an external file \('../../admin.key'\)"):
        check_onnx_contents(model)


def test_onnx_local_functions_of_standard_ops_pass_and_standard_models_pass(tmp_path: Path) -> None:
    check_onnx(onnx_file(tmp_path, onnx.load_from_string(make_onnx())))
    body = helper.make_function(
        "pkg.onnxscript.torch_lib", "Double", ["a"], ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 17)],
    )
    model = helper.make_model(
        linear_graph(helper.make_node("Double", ["x"], ["y"], domain="pkg.onnxscript.torch_lib")),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pkg.onnxscript.torch_lib", 1)],
        functions=[body],
    )
    check_onnx(onnx_file(tmp_path, model))
    model.functions[0].node[0].domain = "com.attacker"  # a local function's body is checked like the graph
    with pytest.raises(InvalidArgument, match="function pkg.onnxscript.torch_lib.Double"):
        check_onnx_contents(model)


def test_a_dynamo_onnx_export_passes(tmp_path: Path) -> None:
    """What the trainer's export and `maas models import-pretrained` write: torch.onnx dynamo."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)).eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 4),), str(path), input_names=["x"], output_names=["y"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False,
        )
    check_onnx(path)


# Through the registry's API


async def test_upload_refuses_the_file_reader_and_the_switch_skips_only_the_operator_check(
    stub: TenantStub, tmp_path: Path
) -> None:
    await stub.create_model("m")
    reader = saved(FileReader(), tmp_path).read_bytes()
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.upload("m", reader), "aten::from_file")
    big = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[2**62])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[2])],
    )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.upload("m", saved(nn.Linear(4, 2), tmp_path, "linear.pt").read_bytes(), signature=big),
        "input 'x' has shape",
    )


@pytest.fixture
def unsafe_registry_settings(tmp_path: Path) -> RegistrySettings:
    return RegistrySettings(
        home=tmp_path / "unsafe",
        registry_addr="127.0.0.1:0",
        internal_token="test-internal-token",
        registry_unsafe_skip_operator_check=True,
    )


async def test_with_the_operator_check_off_pickles_and_formats_are_still_checked(
    unsafe_registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    from services.common.server import running
    from services.registry.server import create_app

    async with running(await create_app(unsafe_registry_settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = TenantStub(channel, "tenant-a")
            await stub.create_model("m")
            # The runtime fence's test needs exactly this: the file reader becomes a version.
            assert (await stub.upload("m", saved(FileReader(), tmp_path).read_bytes())).version == 1
            await expect_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.upload("m", checkpoint_with_code(tmp_path).read_bytes()),
                "torch.save checkpoint",
            )
            members = members_of(saved(nn.Linear(4, 2), tmp_path, "linear.pt"))
            root = next(iter(members)).split("/")[0]
            members[f"{root}/data.pkl"] = pickle_of(Shell(), 2)
            await expect_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.upload("m", zip_with(tmp_path, members).read_bytes()),
                "posix.system",
            )
