"""Format and safety checks on uploaded bytes before they become a version or dataset version.

Nothing here loads or unpickles an artifact in this process: TorchScript archives are inspected
as zip files (their pickles opcode by opcode) and their operators in a short-lived subprocess
(services.registry.torchscript_ops), ONNX models by the ONNX checker and a walk of their graphs,
Hugging Face language models (maas.hf_format) by their safetensors header, datasets by their
headers. torch is deliberately not imported.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from maas import hf_format
from tokenizers import Tokenizer

from services.common.errors import InvalidArgument
from services.registry import torchscript_ops
from services.registry.store import ArtifactFormat, DatasetFormat
from services.registry.torchscript_pickles import root_global, scan_pickles

PICKLE_REFUSED = (
    "pickled artifacts are refused; export with torch.jit.script/trace + torch.jit.save or torch.onnx.export"
)
PICKLE_PROTOCOL_2_OR_LATER = b"\x80"
# A CSV header row longer than this is not a header row.
MAX_CSV_HEADER_BYTES = 1024 * 1024
# The metadata task of a language model: its deployments serve Generate (services.common.serving).
LANGUAGE_TASK = "language"
# TorchScript's printed code calls non-aten operators as ops.<namespace>.<name>.
CODE_OPERATOR = re.compile(rb"\bops\s*\.\s*([A-Za-z_]\w*)\s*\.\s*([A-Za-z_]\w*)")
MAX_CODE_BYTES = 64 * 1024 * 1024
# The ONNX operator sets every runtime implements; anything else is a custom op.
STANDARD_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def check_artifact(format: ArtifactFormat, path: Path, *, check_operators: bool = True) -> dict[str, str]:
    """Refuses what is not a sound artifact of `format`; returns the metadata the registry derives
    from the bytes themselves (replacing what the uploader claimed)."""
    if format is ArtifactFormat.TORCHSCRIPT:
        check_torchscript(path, check_operators=check_operators)
    elif format is ArtifactFormat.SAFETENSORS:
        return check_safetensors(path)
    else:
        check_onnx(path)
    return {}


def check_safetensors(path: Path) -> dict[str, str]:
    """A Hugging Face decoder-only model packed by maas.hf_format: only the header is read (at
    most hf_format.MAX_HEADER_BYTES), never the weights. Its tensors must tile the file, its config
    name a supported architecture without custom code, and its tokenizer and chat template parse.
    Returns what the model is (architecture, model_type, parameters, context_length, dtype) and
    its task, language."""
    what = "this safetensors artifact"
    try:
        header, data_start = hf_format.read_header(path, what)
        derived = hf_format.describe(header, path.stat().st_size - data_start, what)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    texts = header["__metadata__"]
    try:
        Tokenizer.from_str(texts[hf_format.TOKENIZER_KEY])
    except Exception as exc:  # the tokenizers library parses untrusted JSON: any failure means "not one"
        raise InvalidArgument(f"tokenizer.json in {what}'s metadata is not a tokenizers tokenizer: {exc}") from None
    if hf_format.CHAT_TEMPLATE_KEY in texts:
        try:
            ImmutableSandboxedEnvironment().parse(texts[hf_format.CHAT_TEMPLATE_KEY])
        except TemplateSyntaxError as exc:
            raise InvalidArgument(f"the chat template in {what}'s metadata is not a Jinja template: {exc}") from None
    return {**derived, "task": LANGUAGE_TASK}


def check_torchscript(path: Path, *, check_operators: bool = True) -> None:
    """A torch.jit.save archive is a zip with <root>/data.pkl, <root>/constants.pkl and compiled
    code under <root>/code/; a torch.save checkpoint has the pickle but no code, and a raw pickle
    is no zip at all. Every pickle in it must name only what TorchScript writes, and every
    operator its code uses must be on the allowlist (`check_operators=False` skips only this
    last check, for tests of the runtime fence)."""
    with path.open("rb") as file:
        if file.read(1) == PICKLE_PROTOCOL_2_OR_LATER:
            raise InvalidArgument(f"this artifact is a raw pickle: {PICKLE_REFUSED}")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_torchscript_archive(archive)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as exc:
        # A damaged, encrypted or oddly compressed member: torch.jit.save writes none of these.
        raise InvalidArgument(
            "this artifact is not a TorchScript archive (the zip file torch.jit.save writes): "
            f"{type(exc).__name__}"
        ) from None
    if check_operators:
        torchscript_ops.check_operators(path)


def _check_torchscript_archive(archive: zipfile.ZipFile) -> None:
    names = archive.namelist()
    entries = [name.split("/") for name in names]
    data = [name for name, parts in zip(names, entries, strict=True) if parts[1:] == ["data.pkl"]]
    has_code = any(len(parts) > 2 and parts[1] == "code" for parts in entries)
    has_constants = any(parts[1:] == ["constants.pkl"] for parts in entries)
    if data and not has_code:
        raise InvalidArgument(
            f"this artifact is a torch.save checkpoint, not a TorchScript archive: {PICKLE_REFUSED}"
        )
    if not data:
        raise InvalidArgument(
            "this zip file is not a TorchScript archive: it lacks data.pkl and code/ "
            "(export with torch.jit.script/trace + torch.jit.save)"
        )
    scan_pickles(archive)
    # torch.save writes a dict or an eager module as the root; torch.jit.save a __torch__ class.
    root = root_global(archive, data[0])
    if not has_constants or not root.startswith("__torch__.") or root.startswith("__torch__.torch.classes."):
        raise InvalidArgument(
            "this artifact is a torch.save checkpoint with code files added, not a TorchScript archive "
            f"(its data.pkl holds {root or 'no class'}): {PICKLE_REFUSED}"
        )
    _check_code_operators(archive, [name for name in names if name.endswith(".py")])


def _check_code_operators(archive: zipfile.ZipFile, code_files: Iterable[str]) -> None:
    """Name a custom operator early: torch cannot even load an archive that calls an operator its
    process has not registered, so the subprocess could only say that loading failed."""
    budget = MAX_CODE_BYTES
    for name in code_files:
        with archive.open(name) as file:
            code = file.read(budget + 1)
        budget -= len(code)
        if budget < 0:
            raise InvalidArgument(f"this archive holds more than {MAX_CODE_BYTES} bytes of code")
        for match in CODE_OPERATOR.finditer(code):
            namespace, operator = (group.decode() for group in match.groups())
            if namespace not in torchscript_ops.ALLOWED_NAMESPACES:
                raise InvalidArgument(
                    f"this TorchScript model calls the custom operator {namespace}::{operator} (in {name}); "
                    "models may use aten, prim and quantized operators only"
                )


def check_onnx(path: Path) -> None:
    try:
        # The path form lets the checker stream large models instead of holding a second copy.
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # the checker parses untrusted bytes: any failure means "not valid ONNX"
        raise InvalidArgument(f"this artifact is not a valid single-file ONNX model: {exc}") from None
    check_onnx_contents(model)


def check_onnx_contents(model: onnx.ModelProto) -> None:
    """Standard operator sets only, and every tensor inside the file: an ONNX runtime resolves a
    custom domain to a native library, and external data to any path on the node.

    Model-local functions (torch.onnx's exporter may write them) are allowed under any domain,
    since their bodies are checked here like the main graph."""
    local = {(function.domain, function.name) for function in model.functions}
    local_domains = {domain for domain, _ in local}
    for where, opsets in [("the model", model.opset_import)] + [
        (f"function {function.domain}.{function.name}", function.opset_import) for function in model.functions
    ]:
        for opset in opsets:
            if opset.domain not in STANDARD_ONNX_DOMAINS and opset.domain not in local_domains:
                raise InvalidArgument(
                    f"{where} imports the operator set {opset.domain!r}; only the standard ONNX domains "
                    "('ai.onnx', 'ai.onnx.ml') are allowed"
                )
    _check_onnx_graph(model.graph, local, "the graph")
    for function in model.functions:
        _check_onnx_nodes(function.node, local, f"function {function.domain}.{function.name}")


def _check_onnx_graph(graph: onnx.GraphProto, local: set[tuple[str, str]], where: str) -> None:
    for tensor in graph.initializer:
        _check_onnx_tensor(tensor, f"initializer {tensor.name!r} of {where}")
    for sparse in graph.sparse_initializer:
        _check_onnx_tensor(sparse.values, f"sparse initializer {sparse.values.name!r} of {where}")
        _check_onnx_tensor(sparse.indices, f"sparse initializer {sparse.values.name!r} of {where}")
    _check_onnx_nodes(graph.node, local, where)


def _check_onnx_nodes(nodes: Iterable[onnx.NodeProto], local: set[tuple[str, str]], where: str) -> None:
    for node in nodes:
        if node.domain not in STANDARD_ONNX_DOMAINS and (node.domain, node.op_type) not in local:
            raise InvalidArgument(
                f"node {node.name or node.op_type!r} of {where} is the operator {node.domain}.{node.op_type} "
                "from a custom domain; only the standard ONNX domains ('ai.onnx', 'ai.onnx.ml') are allowed"
            )
        inside = f"{where}, node {node.name or node.op_type!r}"
        for attribute in node.attribute:
            if attribute.HasField("t"):
                _check_onnx_tensor(attribute.t, f"attribute {attribute.name!r} of {inside}")
            for tensor in attribute.tensors:
                _check_onnx_tensor(tensor, f"attribute {attribute.name!r} of {inside}")
            if attribute.HasField("sparse_tensor"):
                _check_onnx_tensor(attribute.sparse_tensor.values, f"attribute {attribute.name!r} of {inside}")
            if attribute.HasField("g"):
                _check_onnx_graph(attribute.g, local, inside)
            for subgraph in attribute.graphs:
                _check_onnx_graph(subgraph, local, inside)


def _check_onnx_tensor(tensor: onnx.TensorProto, what: str) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        raise InvalidArgument(
            f"the {what} keeps its data in an external file ({location[:200]!r}); upload one self-contained "
            "file (onnx.save_model(..., save_as_external_data=False), torch.onnx.export(..., external_data=False))"
        )


def check_dataset(format: DatasetFormat, target_column: str, path: Path) -> None:
    if format is DatasetFormat.NPZ:
        check_npz(path)
    else:
        check_csv(path, target_column)


def check_npz(path: Path) -> None:
    """An .npz with arrays X and y of the same length, neither needing pickle. Only the array
    headers are read, so a large dataset is not loaded into memory."""
    # np.load reads a bare .npy eagerly; only hand it zip files.
    if not zipfile.is_zipfile(path):
        raise InvalidArgument("an NPZ dataset must be a numpy .npz archive (numpy.savez) holding X and y")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = sorted({"X", "y"} - set(archive.files))
            if missing:
                raise InvalidArgument(
                    f"the .npz archive lacks array(s) {missing}; it has {sorted(archive.files)[:20]}"
                )
            x_shape = _npy_shape(archive.zip, "X")
            y_shape = _npy_shape(archive.zip, "y")
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(
            f"the .npz archive cannot be read with numpy.load(allow_pickle=False): {exc}"
        ) from None
    if not x_shape or not y_shape or x_shape[0] != y_shape[0] or x_shape[0] < 1:
        raise InvalidArgument(
            f"X has shape {list(x_shape)} and y {list(y_shape)}: "
            "both need the same number of rows, at least one"
        )


def _npy_shape(archive: zipfile.ZipFile, name: str) -> tuple[int, ...]:
    with archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise InvalidArgument(
                f"array {name} uses .npy format version {version}; save it with numpy.savez"
            )
    if dtype.hasobject:
        raise InvalidArgument(f"array {name} holds Python objects, which need pickle: use numeric arrays")
    return tuple(shape)


def check_csv(path: Path, target_column: str) -> None:
    with path.open("rb") as file:
        first_line = file.readline(MAX_CSV_HEADER_BYTES)
    if not first_line.endswith(b"\n") and len(first_line) == MAX_CSV_HEADER_BYTES:
        raise InvalidArgument(f"the CSV header row is longer than {MAX_CSV_HEADER_BYTES} bytes")
    try:
        text = first_line.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidArgument("the CSV file must be UTF-8 text with a header row") from None
    columns = [column.strip() for column in next(csv.reader([text]), [])]
    if target_column not in columns:
        raise InvalidArgument(
            f"the CSV header row has columns {columns[:20]}; the dataset's target column {target_column!r} "
            "is missing"
        )
