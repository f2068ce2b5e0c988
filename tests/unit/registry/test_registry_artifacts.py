"""Format checks: TorchScript archives and ONNX pass; pickles and junk are refused unopened."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.registry.artifacts import PICKLE_REFUSED, check_csv, check_npz, check_onnx, check_torchscript


def file_with(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "upload.part"
    path.write_bytes(data)
    return path


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_torchscript_archive_passes(tmp_path: Path, torchscript_bytes: bytes) -> None:
    check_torchscript(file_with(tmp_path, torchscript_bytes))


def test_torch_save_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 2).state_dict(), buffer)
    with pytest.raises(InvalidArgument, match="torch.save checkpoint") as refused:
        check_torchscript(file_with(tmp_path, buffer.getvalue()))
    assert PICKLE_REFUSED in str(refused.value)


def test_raw_pickle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="raw pickle") as refused:
        check_torchscript(file_with(tmp_path, pickle.dumps({"weights": [1, 2]})))
    assert PICKLE_REFUSED in str(refused.value)


@pytest.mark.parametrize("data", [b"not a zip at all", b""])
def test_junk_is_not_torchscript(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not a TorchScript archive"):
        check_torchscript(file_with(tmp_path, data))


def test_a_zip_without_torchscript_layout_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "hi")
    with pytest.raises(InvalidArgument, match="lacks data.pkl"):
        check_torchscript(file_with(tmp_path, buffer.getvalue()))


def test_onnx_passes_and_junk_is_refused(tmp_path: Path, onnx_bytes: bytes) -> None:
    check_onnx(file_with(tmp_path, onnx_bytes))
    with pytest.raises(InvalidArgument, match="not a valid single-file ONNX model"):
        check_onnx(file_with(tmp_path, b"hello world, not onnx"))


def test_npz_needs_x_and_y_of_equal_length(tmp_path: Path) -> None:
    check_npz(file_with(tmp_path, npz(X=np.zeros((3, 2)), y=np.arange(3))))
    with pytest.raises(InvalidArgument, match=r"lacks array\(s\) \['y'\]"):
        check_npz(file_with(tmp_path, npz(X=np.zeros((3, 2)))))
    with pytest.raises(InvalidArgument, match="same number of rows"):
        check_npz(file_with(tmp_path, npz(X=np.zeros((3, 2)), y=np.arange(4))))


def test_npz_refuses_object_arrays_and_non_archives(tmp_path: Path) -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(InvalidArgument, match="pickle"):
        check_npz(file_with(tmp_path, npz(X=objects, y=np.arange(2))))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    with pytest.raises(InvalidArgument, match=r"numpy \.npz archive"):
        check_npz(file_with(tmp_path, buffer.getvalue()))


def test_csv_header_needs_the_target_column(tmp_path: Path) -> None:
    check_csv(file_with(tmp_path, "\ufeffa,b,label\n1,2,3\n".encode()), "label")
    with pytest.raises(InvalidArgument, match="'label' is missing"):
        check_csv(file_with(tmp_path, b"a,b\n1,2\n"), "label")
    with pytest.raises(InvalidArgument, match="UTF-8"):
        check_csv(file_with(tmp_path, b"\xff\xfe,label\n"), "label")
