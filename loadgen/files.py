"""Result files written whole or not at all: a temporary file beside the target, flushed and fsynced,
then renamed over it.

A run can be killed at any instant (Ctrl-C twice, a CI job's timeout, the OOM killer). Opening
summary.json with "w" truncates it first, so a kill during the write left an empty or half-written file
where the previous run's complete one had been, and a script reading it got a JSON error, or worse, a
valid prefix. With `atomic_writer` a reader sees either the previous file or the complete new one: the
rename is atomic on POSIX file systems, and the fsyncs (file, then folder) keep a crash of the machine
from leaving the new name on unwritten blocks.

The lowest layer: imports nothing of loadgen.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["atomic_writer", "write_text_atomic"]


def _file_mode() -> int:
    """What open(path, "w") would give a new file: 0o666 less the umask (mkstemp makes 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], newline: str | None = None) -> Iterator[TextIO]:
    """A text file (UTF-8) that replaces `path` when the block ends without an exception; on one, `path`
    is left as it was and the temporary file removed."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """`Path.write_text`, atomically (see atomic_writer)."""
    with atomic_writer(path) as out:
        out.write(text)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some file systems cannot open a folder: then it is skipped."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
