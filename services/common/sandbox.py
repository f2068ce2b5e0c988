"""A Landlock fence for a process that runs untrusted code: it may read only the paths it is
given, write only the files it is given, open no TCP connection and bind no port, and (through
Landlock's ptrace rule) read no other process's memory or environment.

The fence holds for the calling thread and every process it execs or forks afterwards, so the
usual use is: confine, then exec the program to fence. Nothing here needs root.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import landlockpy
from landlockpy import AccessFS, AccessNet, Ruleset, Scope

READ = AccessFS.READ_FILE | AccessFS.READ_DIR
READ_EXECUTE = READ | AccessFS.EXECUTE
# Writing an existing file (a shared-memory region, /dev/null): no creating, removing or renaming.
READ_WRITE = READ | AccessFS.WRITE_FILE | AccessFS.TRUNCATE
DEVICE = READ_WRITE | AccessFS.IOCTL_DEV
# Beyond the ones handled here nothing is granted: every file-system and TCP right is handled.
HANDLED_NET = AccessNet.BIND_TCP | AccessNet.CONNECT_TCP

# What a dynamically linked program and the Python runtime read at start-up, besides its prefix.
SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/proc", "/sys/devices/system/cpu",
                   "/sys/fs/cgroup", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
                   "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class FenceUnavailable(RuntimeError):
    """The kernel has no Landlock (too old, or disabled at boot): the fence cannot be raised."""


def available() -> bool:
    return landlockpy.abi_version() >= 1


def python_runtime() -> list[Path]:
    """The directories the running interpreter and its packages load from, symlinks resolved
    (Landlock checks the file actually opened, not the link that named it)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_config_var("LIBDIR") or sys.prefix}
    found = set()
    for path in paths:
        found.add(Path(path))
        found.add(Path(path).resolve())
    found.add(Path(sys.executable).resolve().parent)
    return sorted(found)


def gpu_devices() -> list[Path]:
    """NVIDIA device nodes, where the host has them: a model on the GPU needs its ioctls."""
    return sorted(Path("/dev").glob("nvidia*"))


def confine(
    readable: Iterable[Path | str],
    writable: Iterable[Path | str] = (),
    devices: Iterable[Path | str] = (),
) -> None:
    """Fence this thread and what it execs: read `readable` (executables in them may run),
    read and write the existing files in `writable`, use `devices`; nothing else on the file
    system, no TCP bind or connect, no signal to a process outside the fence, no abstract unix
    socket outside it. Paths that do not exist are skipped. Raises FenceUnavailable without
    Landlock."""
    if not available():
        raise FenceUnavailable("this kernel has no Landlock; the model fence cannot be raised")
    with Ruleset(handled_net=HANDLED_NET, scoped=Scope.ABSTRACT_UNIX_SOCKET) as ruleset:
        for paths, access in ((readable, READ_EXECUTE), (writable, READ_WRITE), (devices, DEVICE)):
            for path in paths:
                if os.path.exists(path):
                    ruleset.allow_path(path, _for_kind(Path(path), access))
        ruleset.restrict()


def _for_kind(path: Path, access: AccessFS) -> AccessFS:
    # A rule on a regular file may carry only the rights that apply to files.
    return access if path.is_dir() else access & ~AccessFS.READ_DIR
