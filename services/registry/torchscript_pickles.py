"""Opcode-by-opcode scan of the pickles inside a TorchScript archive. Nothing is unpickled.

torch.jit.load reads data.pkl, constants.pkl and the *.debug_pkl source maps with its own C++
unpickler, which resolves only a few globals. A pickle naming anything else (os.system,
builtins.eval, ...) is not a TorchScript archive, whatever else it looks like, so it is refused
before any loader sees it.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Iterator

from services.common.errors import InvalidArgument

# The globals torch.jit.save writes (read off real archives of scripted, traced, fp16 and int8
# models, and torch's pickler), besides the archive's own `__torch__.*` classes.
ALLOWED_GLOBALS = {
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"complex"}),
    "torch": frozenset(
        {
            "device",
            "per_tensor_affine",
            "per_channel_affine",
            "per_tensor_symmetric",
            "per_channel_symmetric",
            "per_channel_affine_float_qparams",
        }
    ),
    "torch._utils": frozenset(
        {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_qtensor", "_rebuild_sparse_tensor"}
    ),
    "torch.jit._pickle": frozenset(
        {
            "build_intlist",
            "build_doublelist",
            "build_boollist",
            "build_tensorlist",
            "build_tensor_from_id",
            "restore_type_tag",
        }
    ),
}
TORCH_STORAGE = re.compile(r"^[A-Za-z0-9]+Storage$")  # torch.FloatStorage, torch.QInt8Storage, ...
SCRIPT_CLASS = re.compile(r"^__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Torchbind classes a pickle may rebuild: the int8 tier's packed weights and RNN cells.
ALLOWED_TORCHBIND = re.compile(r"^__torch__\.torch\.classes\.(quantized|rnn)$")
# Opcodes that build objects from classes without naming them through GLOBAL, or that resolve
# through registries or persistent ids TorchScript does not use.
REFUSED_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"})
# Opcodes that push nothing.
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "FRAME", "PROTO"})
STRING_OPCODES = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
# data.pkl of a real model is a few KB (tensor bytes live in data/); far above that is not one.
MAX_PICKLE_BYTES = 64 * 1024 * 1024


def is_pickle_member(name: str) -> bool:
    return name.endswith((".pkl", ".debug_pkl"))


def scan_pickles(archive: zipfile.ZipFile) -> None:
    """Refuse the archive unless every pickle in it names only allowed globals."""
    for member in archive.namelist():
        if is_pickle_member(member):
            for module, name in pickle_globals(member, _read_bounded(archive, member)):
                if not allowed_global(module, name):
                    raise InvalidArgument(
                        f"{member} names the global {module}.{name}, which TorchScript archives never use; "
                        "save the model with torch.jit.save"
                    )


def root_global(archive: zipfile.ZipFile, data_member: str) -> str:
    """The class of the pickled root object: a TorchScript module's is a `__torch__` class."""
    for module, name in pickle_globals(data_member, _read_bounded(archive, data_member)):
        return f"{module}.{name}"
    return ""


def pickle_globals(member: str, data: bytes) -> Iterator[tuple[str, str]]:
    """The (module, name) of every GLOBAL and STACK_GLOBAL, in order; refuses opcodes that load
    classes any other way and a STACK_GLOBAL whose operands are not plain strings."""
    # The last two values pushed, strings kept: a STACK_GLOBAL must follow its two string operands
    # directly (memo lookups are not followed: torch.jit.save writes GLOBAL only).
    pushed: list[str | None] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in REFUSED_OPCODES:
                raise InvalidArgument(
                    f"{member} uses the pickle opcode {opcode.name}, which TorchScript archives never use; "
                    "save the model with torch.jit.save"
                )
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                yield module, name
                pushed.append(None)
            elif opcode.name == "STACK_GLOBAL":
                module, name = pushed[-2:] if len(pushed) == 2 else (None, None)
                if module is None or name is None:
                    raise InvalidArgument(f"{member} loads a global it does not name plainly; refused")
                yield module, name
                pushed = [None]
            elif opcode.name in STRING_OPCODES:
                pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif opcode.name not in MEMO_OPCODES:
                pushed.append(None)
            del pushed[:-2]
    except ValueError as exc:  # genops on bytes that are no pickle
        raise InvalidArgument(f"{member} is not a valid pickle: {exc}") from None


def allowed_global(module: str, name: str) -> bool:
    if module in ALLOWED_GLOBALS:
        return name in ALLOWED_GLOBALS[module] or (module == "torch" and bool(TORCH_STORAGE.match(name)))
    if module.startswith("__torch__.torch.classes.") or module == "__torch__.torch.classes":
        return bool(ALLOWED_TORCHBIND.match(module)) and name.isidentifier()
    return bool(SCRIPT_CLASS.match(module)) and name.isidentifier()


def _read_bounded(archive: zipfile.ZipFile, member: str) -> bytes:
    with archive.open(member) as file:
        data = file.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise InvalidArgument(f"{member} is larger than {MAX_PICKLE_BYTES} bytes: not a TorchScript archive")
    return data
