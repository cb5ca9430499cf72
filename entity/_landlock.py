"""Filesystem confinement for the pruning child with Linux Landlock: it cannot open the keys.

The pruning child runs as the entity's own user, so file permissions alone would let it read the
entity's signing key if the received graph ever got it to run code (the op allow-list is the first
wall; this is the second). Landlock (Linux 5.13+, unprivileged, per process and inherited by its
threads and children) lets a process give up filesystem access for good: after ``confine`` the
child may read only below the directories it needs to finish importing Python and torch modules
(the interpreter's prefixes, ``sys.path`` entries, the project's own package folders, system
library folders), and read and write only below ``/dev``, ``/proc``, ``/sys`` and its own private
temporary folder. The entity's home, its keys, the owner registry and every other path are
refused by the kernel, whatever the process does.

Called with ctypes (the three system calls have the same numbers on x86-64 and aarch64). Where the
kernel lacks Landlock the call says so and nothing is confined; the caller reports it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ConfinementError", "abi_version", "confine"]

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_BASE_ACCESS = (1 << 13) - 1  # execute .. make_sym: every right of Landlock ABI 1
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
READ = _EXECUTE | _READ_FILE | _READ_DIR


class ConfinementError(OSError):
    """Landlock is unavailable here, or the kernel refused the ruleset."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),)


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or this is not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def _handled(abi: int) -> int:
    access = _BASE_ACCESS
    if abi >= 2:
        access |= _REFER
    if abi >= 3:
        access |= _TRUNCATE
    if abi >= 5:
        access |= _IOCTL_DEV
    return access


def _fail(what: str) -> ConfinementError:
    errno = ctypes.get_errno()
    return ConfinementError(errno, f"Landlock {what} failed: {os.strerror(errno)}")


def confine(readable: Iterable[Path], writable: Iterable[Path]) -> int:
    """Allow this process only reading below ``readable`` and everything below ``writable``.

    Returns the Landlock ABI version used. Missing paths are skipped. Irreversible for this
    process and everything it starts. Raises ``ConfinementError`` where Landlock is unavailable.
    """
    abi = abi_version()
    if abi < 1:
        raise ConfinementError(38, "Landlock is not available in this kernel")  # ENOSYS
    libc = _libc()
    handled = _handled(abi)
    attr = _RulesetAttr(handled)
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise _fail("create_ruleset")
    try:
        rules = [(Path(p), READ) for p in readable] + [(Path(p), handled) for p in writable]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
            except OSError:
                continue  # absent (no /lib64 here, say): nothing to allow
            try:
                rule = _PathBeneathAttr(access & handled, fd)
                if libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise _fail(f"add_rule for {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _fail("no_new_privs")
        if libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise _fail("restrict_self")
    finally:
        os.close(ruleset)
    return abi
