"""Who may use a store directory, and what a dead writer left behind in it.

A directory under `nvme_path` has one writer at a time and any number of readers of the same weights, in this process
or others: `StoreLock` is an `flock` on a lock file in the directory, exclusive while a store is written or checked,
shared while offloaded models read it. `flock` locks belong to an open file, so two models in one process exclude
each other like two processes do, and the kernel drops the lock of a process that exits or crashes.

Every file the runtime writes is first created under a unique temporary name (`O_CREAT | O_EXCL | O_NOFOLLOW`, via
`tempfile.mkstemp`), then renamed over its final name: a link planted at a predictable name is replaced, never
followed. `remove_leftovers` removes what an interrupted writer left (temporary files, conversion folders of dead
processes).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time


LOCK_NAME = ".hf_moe_offload.lock"
TEMP_PREFIX = ".hf_moe_offload_tmp_"
CONVERT_PREFIX = ".hf_moe_offload_convert_"


class StoreLock:
    """The lock of the store directory `path` (not taken yet: `try_exclusive`, `shared`)."""

    def __init__(self, path: str):
        self.path = path
        self.file = os.path.join(path, LOCK_NAME)
        try:
            self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ValueError(f"the store lock {self.file} cannot be opened: {err.strerror or err}") from err
        self.mode: str | None = None

    def try_exclusive(self) -> bool:
        """Take the lock alone, without waiting; False when another model holds it (shared or exclusive)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.mode = "exclusive"
        return True

    def shared(self, wait: bool = True) -> bool:
        """Take (or turn the exclusive lock into) a shared lock, waiting for a writer to finish when `wait`."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        self.mode = "shared"
        return True

    def record_owner(self, what: str) -> None:
        """Write who holds the store (shown to a model refused it)."""
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def owner(self) -> str:
        """Who last wrote the store, as recorded in the lock file."""
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        return text or "an unknown process"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1
            self.mode = None


def temporary_file(directory: str, final_name: str) -> tuple[int, str]:
    """A new file in `directory` for the content of `final_name`, created exclusively (no link is followed);
    returns (fd, path)."""
    return tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final_name}.", suffix=".tmp", dir=directory)


def conversion_folder(directory: str | None) -> str:
    """A new folder for tensors transformers converts while loading, named with this process's id so that a later
    open of the directory knows when its owner is gone."""
    return tempfile.mkdtemp(prefix=f"{CONVERT_PREFIX}{os.getpid()}_", dir=directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(directory: str, temporary_files: bool = True) -> list[str]:
    """Remove from `directory` the conversion folders of processes that are gone and, with `temporary_files` (when
    the caller holds the exclusive lock: no live writer owns them), the temporary files; returns the names removed."""
    removed = []
    for entry in os.scandir(directory):
        if temporary_files and entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
        elif entry.name.startswith(CONVERT_PREFIX) and entry.is_dir(follow_symlinks=False):
            pid = entry.name[len(CONVERT_PREFIX) :].partition("_")[0]
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
    return removed
