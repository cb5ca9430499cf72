"""File helpers: atomic writes (a reader or a crash sees the old file or the new one, never half of
one) and bounded reads that refuse anything but a regular file."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import ProtocolError


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, then rename.

    With ``overwrite=False`` an existing ``path`` is never replaced (``os.link`` fails instead of
    clobbering), so two processes cannot both "create" the same key file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # raises FileExistsError rather than replacing
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def read_regular(path: Path, *, limit: int | None, error: type[ProtocolError], what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, else ``error``.

    Opened non-blocking and checked with ``fstat`` before any read, so a FIFO, device or folder
    put where a card, key or log is expected is refused at once instead of hanging the reader or
    feeding it endless bytes; at most ``limit + 1`` bytes are ever read, so a file padded to
    gigabytes is refused without being loaded. Symbolic links are followed (reading through one
    is harmless; writers that must not follow them open with ``O_NOFOLLOW`` themselves).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise error(f"{what} {path} not found") from exc
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {_kind_of(st.st_mode)}, not a regular file; give the path of a plain file")
        if limit is not None and st.st_size > limit:
            raise error(f"{what} {path} is larger than {limit} bytes; it cannot be a valid {what}")
        chunks: list[bytes] = []
        total = 0
        while limit is None or total <= limit:
            want = 1 << 20 if limit is None else min(1 << 20, limit + 1 - total)
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if limit is not None and total > limit:
            raise error(f"{what} {path} is larger than {limit} bytes; it cannot be a valid {what}")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
