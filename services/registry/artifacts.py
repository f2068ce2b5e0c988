"""Format checks on uploaded bytes before they become a version or dataset version.

Nothing here loads or unpickles an artifact: TorchScript archives are inspected as zip files,
ONNX models by the ONNX checker, datasets by their headers. torch is deliberately not imported.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import onnx

from services.common.errors import InvalidArgument
from services.registry.store import ArtifactFormat, DatasetFormat

PICKLE_REFUSED = (
    "pickled artifacts are refused; export with torch.jit.script/trace + torch.jit.save or torch.onnx.export"
)
PICKLE_PROTOCOL_2_OR_LATER = b"\x80"
# A CSV header row longer than this is not a header row.
MAX_CSV_HEADER_BYTES = 1024 * 1024


def check_artifact(format: ArtifactFormat, path: Path) -> None:
    if format is ArtifactFormat.TORCHSCRIPT:
        check_torchscript(path)
    else:
        check_onnx(path)


def check_torchscript(path: Path) -> None:
    """A torch.jit.save archive is a zip with <root>/data.pkl and compiled code under <root>/code/;
    a torch.save checkpoint has the pickle but no code, and a raw pickle is no zip at all."""
    with path.open("rb") as file:
        if file.read(1) == PICKLE_PROTOCOL_2_OR_LATER:
            raise InvalidArgument(f"this artifact is a raw pickle: {PICKLE_REFUSED}")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [name.split("/") for name in archive.namelist()]
    except zipfile.BadZipFile:
        raise InvalidArgument(
            "this artifact is not a TorchScript archive (the zip file torch.jit.save writes)"
        ) from None
    has_data = any(parts[1:] == ["data.pkl"] for parts in entries)
    has_code = any(len(parts) > 2 and parts[1] == "code" for parts in entries)
    if has_data and not has_code:
        raise InvalidArgument(
            f"this artifact is a torch.save checkpoint, not a TorchScript archive: {PICKLE_REFUSED}"
        )
    if not has_data:
        raise InvalidArgument(
            "this zip file is not a TorchScript archive: it lacks data.pkl and code/ "
            "(export with torch.jit.script/trace + torch.jit.save)"
        )


def check_onnx(path: Path) -> None:
    try:
        # The path form lets the checker stream large models instead of holding a second copy.
        onnx.checker.check_model(str(path))
    except Exception as exc:  # the checker parses untrusted bytes: any failure means "not valid ONNX"
        raise InvalidArgument(f"this artifact is not a valid single-file ONNX model: {exc}") from None


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
