"""Weight stores: where every offloaded byte lives between two uses, and how it is read back.

- `CpuStore`: one arena (a uint8 tensor) per unit in host memory, page-locked when the execution device is CUDA.
- `NvmeStore`: one safetensors file per unit in a directory, the data starting on a 4 KiB boundary so the region can
  be read with `O_DIRECT`, plus `manifest.json` (layout, sizes, CRC32 checksums, the source's fingerprint) written
  last and atomically. A store is reused only when its manifest says it holds the same tensors from the same source
  and records every file's size and checksum, and every file has them; without a manifest (an interrupted write),
  with incomplete records or with another source it is rebuilt. The directory has one owner (`ownership.py`): a
  second model asking for it with other weights is refused, one with the same weights shares it read-only.
- `CheckpointStore`: ranges read straight from a checkpoint's safetensors shards (no copy on disk).

Files are written under unique temporary names and renamed into place, then kept read-only. Every read checks that
the file it read is still the one opened (inode, size, modification and change times): bytes changed under the
store are an error, never used. `verify` checks a unit's bytes against their CRC32.

The layout of each unit's region is `layout.py`'s; this module only reads and writes bytes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..progress import progress_bar
from . import pages
from .collective import flag_device, raise_together
from .layout import ALIGN, SAFETENSORS_DTYPES, ReadRange, TensorSource, TensorSpec, UnitPlan, align_up, tensor_bytes
from .ownership import StoreLock, remove_leftovers, temporary_file


logger = logging.get_logger(__name__)

STORE_FORMAT = 2  # 2: experts stored expert-major
_MAP_MERGE_GAP = 1 << 20  # map across gaps up to this size between ranges rather than map twice
MANIFEST = "manifest.json"
_UNIT_FILE = re.compile(r"unit_\d+\.safetensors")
_CRC_CHUNK = 16 << 20


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What says a file is still the one the store opened: device, inode, size, modification and change times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_writable_dir(path: str, what: str = "nvme_path") -> None:
    """Create `path` if needed and check that a file can be created in it; a clear ValueError otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} ({path}) cannot be created: {err.strerror or err}") from err
    if not os.path.isdir(path):
        raise ValueError(f"{what} ({path}) is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hf_moe_offload_probe_", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} ({path}) is not writable: {err.strerror or err}") from err


def weights_fingerprint(plans: list[UnitPlan], source: TensorSource) -> dict:
    """The fingerprint of a store written from weights in memory: a CRC32 of each unit's own tensors."""
    crcs = []
    for plan in plans:
        crc = 0
        for tensor in source(plan):
            crc = crc32_tensor(tensor_bytes(tensor), crc)
        crcs.append(crc)
    return {"source": "weights", "crc32": crcs}


def checkpoint_fingerprint(name: str, dtype: torch.dtype, files: list[str], progress: bool = True) -> dict:
    """The fingerprint of a store written from checkpoint shards: the checkpoint's name, the dtype, and each shard's
    name, size and the CRC32 of its whole content (its safetensors header and every tensor), so a checkpoint
    replaced by other weights is never served from a stale store, whatever its sizes and times say."""
    total = sum(os.path.getsize(f) for f in files)
    with progress_bar(
        total=total, unit="B", unit_scale=True, desc="Fingerprinting the checkpoint", enabled=progress
    ) as bar:
        records = [[os.path.basename(path), os.path.getsize(path), crc32_file(path, bar)] for path in files]
    return {"source": "checkpoint", "name": name, "dtype": str(dtype), "files": records}


def crc32_file(path: str, bar=None) -> int:
    """The CRC32 of a whole file, read in chunks (each counted on `bar`)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
            if bar is not None:
                bar.update(len(chunk))
    return crc


def crc32_tensor(data: torch.Tensor, crc: int = 0) -> int:
    view = memoryview(data.numpy())
    step = 64 << 20
    for start in range(0, len(view), step):
        crc = zlib.crc32(view[start : start + step], crc)
    return crc


class CpuStore:
    """Every unit's own region in one host arena (pinned when `pin` is set)."""

    name = "cpu"
    direct_io = False
    mappable = False  # its arenas are host memory already: nothing to map
    in_memory = True  # reads are copies from host memory (asynchronous to CUDA from pinned arenas)

    def __init__(
        self,
        plans: list[UnitPlan],
        source: TensorSource,
        allocate: Callable[[int], torch.Tensor] | None = None,
        pinned: bool = False,
        progress: bool = True,
    ):
        """`allocate(nbytes)` gives each arena (default: pageable memory); `pinned` says whether it page-locks."""
        self.arenas: dict[str, torch.Tensor] = {}
        self.pinned = pinned
        self.read_bytes = 0
        self._lock = threading.Lock()
        total = sum(plan.own_nbytes for plan in plans)
        with progress_bar(
            total=total, unit="B", unit_scale=True, desc="Filling the CPU store", enabled=progress
        ) as bar:
            for plan in plans:
                if not plan.own_nbytes:
                    continue
                arena = allocate(plan.own_nbytes) if allocate else torch.empty(plan.own_nbytes, dtype=torch.uint8)
                for (_, offset), tensor in zip(plan.own, source(plan), strict=True):
                    data = tensor_bytes(tensor)
                    arena[offset : offset + data.numel()].copy_(data)
                    bar.update(data.numel())
                self.arenas[plan.key] = arena

    def read(self, rng: ReadRange, dst: torch.Tensor, lo: int, hi: int, check: bool = True) -> None:
        src = rng.src_offset + (lo - rng.dst_offset)
        # to a CUDA slot this runs on the runtime's copy stream: asynchronous from a pinned arena
        dst[lo:hi].copy_(self.arenas[rng.source][src : src + hi - lo], non_blocking=dst.is_cuda)
        with self._lock:
            self.read_bytes += hi - lo

    def tensors(self, plan: UnitPlan) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """The unit's own tensors as CPU tensors viewing the arena (used to put weights back)."""
        arena = self.arenas.get(plan.key)
        for spec, offset in plan.own:
            yield spec, arena[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape)

    def region(self, plan: UnitPlan) -> Callable[[int, int], torch.Tensor]:
        """`region(offset, nbytes)`: the bytes `plan`'s buffer would hold there, as a view of the arena (no copy)."""
        return _region(plan, lambda rng: self.arenas[rng.source][rng.src_offset : rng.src_offset + rng.nbytes])

    def verify(self, plan: UnitPlan) -> None:
        """Nothing to check: the arenas are this process's private memory, written once."""

    def verify_all(self, plans: list[UnitPlan]) -> None:
        """Nothing to check (see `verify`)."""

    def check_identity(self, key: str) -> None:
        """Nothing to check: an arena cannot change under the store."""

    def source_files(self) -> list[str]:
        return []

    def close(self) -> None:
        self.arenas.clear()


def _region(plan: UnitPlan, view: Callable[[ReadRange], torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
    """A `region(offset, nbytes)` over `plan`'s buffer coordinates, each range's bytes given once by `view`."""
    views: dict[int, torch.Tensor] = {}

    def region(offset: int, nbytes: int) -> torch.Tensor:
        for i, rng in enumerate(plan.ranges):
            if rng.dst_offset <= offset and offset + nbytes <= rng.dst_offset + rng.nbytes:
                if i not in views:
                    views[i] = view(rng)
                start = offset - rng.dst_offset
                return views[i][start : start + nbytes]
        raise RuntimeError(f"bytes {offset}..{offset + nbytes} of unit {plan.name} are in no single read range")

    return region


def _safetensors_header(plan: UnitPlan) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "hf_moe_offload", "unit": plan.name}}
    end = 0
    for spec, offset in plan.own:
        if offset > end:  # the format has no holes: alignment gaps are small uint8 padding tensors
            header[f"__padding_{end}__"] = {"dtype": "U8", "shape": [offset - end], "data_offsets": [end, offset]}
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        end = offset + spec.nbytes
    if plan.own_nbytes > end:  # the last expert's alignment tail: every expert region is `stride` bytes
        header[f"__padding_{end}__"] = {
            "dtype": "U8",
            "shape": [plan.own_nbytes - end],
            "data_offsets": [end, plan.own_nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad the JSON with spaces (allowed by the format) so the data starts on a 4 KiB boundary: O_DIRECT-readable.
    length = align_up(len(raw) + 8) - 8
    return struct.pack("<Q", length) + raw + b" " * (length - len(raw))


def read_safetensors_header(path: str) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise RuntimeError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        raw = f.read(length)
    if len(raw) < length:
        raise RuntimeError(f"{path} is truncated inside its safetensors header")
    return 8 + length, json.loads(raw)


@dataclass
class MappedRun:
    """Adjacent ranges of one store file mapped once: `data` views them, `end` is the file offset past their end."""

    source: str
    end: int
    data: torch.Tensor


def _difference(now: tuple, then: tuple) -> str:
    if now[:2] != then[:2]:
        return "its path now names another file"
    if now[2] != then[2]:
        return f"its size changed from {then[2]} to {now[2]} bytes"
    return "its modification or change time moved"


class _FileStore:
    """Reads `ReadRange`s from files with `pread` (from I/O threads; `os.preadv` releases the GIL).

    Every file's identity (`file_identity`) is recorded when the store opens it; each read, each page mapping and
    each verification checks the file is still that one, so bytes changed under the store (another process
    writing, the file replaced) are an error before they are used.
    """

    name = "nvme"
    pinned = False
    in_memory = False
    mappable = True  # `map_runs`: pages mapped from the page cache instead of read into buffers
    follow_links = False  # the store's own files are never links; checkpoint shards may be (the Hub cache)

    def __init__(self, path: str, paths: dict[str, str], data_start: dict[str, int], direct_io: bool):
        self.path = path
        self.read_bytes = 0
        self.direct_io = direct_io
        self._paths = paths
        self._data_start = data_start
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int] = {}
        self._identity: dict[str, tuple] = {}

    # -- identity -------------------------------------------------------------------------------------------------

    def _record_identities(self) -> None:
        for key, path in self._paths.items():
            try:
                st = os.stat(path, follow_symlinks=self.follow_links)
            except OSError as err:
                raise RuntimeError(f"store file {path} cannot be opened: {err.strerror}") from err
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(f"store file {path} is not a regular file (a link or a device): refusing to read it")
            self._identity[key] = file_identity(st)

    def _changed(self, key: str, why: str) -> RuntimeError:
        return RuntimeError(
            f"{self._describe(key)} {self._paths[key]} changed after it was opened ({why}): another process wrote "
            f"or replaced it; its bytes are not used. {self._advice()}"
        )

    def _describe(self, key: str) -> str:
        return "NVMe store file"

    def _advice(self) -> str:
        return f"Delete {self.path} to rebuild the store (nothing else may write in it while a model uses it)"

    def check_identity(self, key: str, fd: int | None = None) -> None:
        """Raise when the file of `key` is not the one the store opened (by its open descriptor and by its path)."""
        expected = self._identity[key]
        now = file_identity(os.fstat(self._fd(key, False) if fd is None else fd))
        if now != expected:
            raise self._changed(key, _difference(now, expected))
        try:
            at_path = os.stat(self._paths[key], follow_symlinks=self.follow_links)
        except OSError as err:
            raise self._changed(key, f"{err.strerror}") from err
        if (at_path.st_dev, at_path.st_ino) != expected[:2]:
            raise self._changed(key, "its path now names another file")

    # -- reading --------------------------------------------------------------------------------------------------

    def _fd(self, key: str, direct: bool) -> int:
        table = self._direct_fds if direct else self._fds
        fd = table.get(key)
        if fd is None:
            with self._lock:
                fd = table.get(key)
                if fd is None:
                    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
                    if not self.follow_links:
                        flags |= os.O_NOFOLLOW
                    try:
                        fd = os.open(self._paths[key], flags)
                    except OSError as err:
                        if direct and err.errno == errno.EINVAL:
                            logger.warning(f"{self.path} refuses O_DIRECT: reading through the page cache")
                            self.direct_io = False
                            return self._fd(key, False)
                        raise RuntimeError(f"cannot open store file {self._paths[key]}: {err.strerror}") from err
                    now = file_identity(os.fstat(fd))
                    if now != self._identity[key]:
                        os.close(fd)
                        raise self._changed(key, _difference(now, self._identity[key]))
                    table[key] = fd
        return fd

    def read(self, rng: ReadRange, dst: torch.Tensor, lo: int, hi: int, check: bool = True) -> None:
        """Bytes `lo..hi` of `rng`'s buffer coordinates into `dst`, then (`check`) the file's identity checked: a
        caller doing many small reads of one file passes False and calls `check_identity` once after them."""
        src = self._data_start[rng.source] + rng.src_offset + (lo - rng.dst_offset)
        want = hi - lo
        length = want
        direct = self.direct_io and src % ALIGN == 0 and lo % ALIGN == 0
        if direct:
            length = min(align_up(want), dst.numel() - lo)  # the buffer's padding absorbs the rounded tail
            direct = length % 512 == 0
        view = memoryview(dst.numpy())[lo : lo + length]
        done = 0
        while done < want:
            try:
                got = os.preadv(self._fd(rng.source, direct), [view[done:]], src + done)
            except OSError as err:
                if direct and err.errno == errno.EINVAL:  # e.g. an unaligned buffer: retry through the page cache
                    direct, view = False, view[:want]
                    continue
                raise RuntimeError(f"reading store file {self._paths[rng.source]} failed: {err.strerror}") from err
            if got == 0:
                raise RuntimeError(
                    f"store file {self._paths[rng.source]} is truncated: byte {src + done} is past its end; "
                    f"{self._advice()}"
                )
            done += got
        if check:
            self.check_identity(rng.source)  # after the read: the bytes read came from the file as opened
        with self._lock:
            self.read_bytes += want

    def map_runs(self, ranges: list[ReadRange]) -> tuple[list[MappedRun], list[torch.Tensor]]:
        """Map `ranges` once, with no page resident yet: one mapping per run of ranges adjacent in one file (a
        checkpoint's tensors of one block usually are). Returns the runs (to `populate_run` before each use and drop
        after) and a view per range."""
        views: list[torch.Tensor | None] = [None] * len(ranges)
        runs: list[MappedRun] = []
        order = sorted(range(len(ranges)), key=lambda i: (ranges[i].source, ranges[i].src_offset))
        run: list[int] = []

        def flush() -> None:
            first, last = ranges[run[0]], max((ranges[i] for i in run), key=lambda r: r.src_offset + r.nbytes)
            span = ReadRange(first.source, first.src_offset, 0, last.src_offset + last.nbytes - first.src_offset)
            data = self.map_lazily(span)
            runs.append(MappedRun(span.source, self._data_start[span.source] + span.src_offset + span.nbytes, data))
            for i in run:
                start = ranges[i].src_offset - first.src_offset
                views[i] = data[start : start + ranges[i].nbytes]

        for i in order:
            if run:
                prev_end = max(ranges[j].src_offset + ranges[j].nbytes for j in run)
                same = ranges[i].source == ranges[run[0]].source
                if not same or ranges[i].src_offset > prev_end + _MAP_MERGE_GAP:
                    flush()
                    run = []
            run.append(i)
        if run:
            flush()
        return runs, views

    def populate_run(self, run: MappedRun) -> None:
        """Map the pages of a run now (zero-copy from the page cache; read from the disk first when not there)."""
        self.populate(run.data, run.source)

    def map_lazily(self, rng: ReadRange) -> torch.Tensor:
        """`rng` as a uint8 tensor over a private mapping of its file, no page mapped yet (`populate` and
        `pages.drop` map and unmap parts of it)."""
        path = self._paths[rng.source]
        start = self._data_start[rng.source] + rng.src_offset
        fd = self._fd(rng.source, False)
        if os.fstat(fd).st_size < start + rng.nbytes:
            raise RuntimeError(
                f"store file {path} is truncated: byte {start + rng.nbytes - 1} is past its end; {self._advice()}"
            )
        self.check_identity(rng.source, fd)
        return pages.map_file(fd, start, rng.nbytes)

    def populate(self, data: torch.Tensor, source: str) -> None:
        """Map the pages under `data` (a view of a mapping of the file of `source`) now, counted as read."""
        pages.populate(data)
        self.check_identity(source)  # after mapping: the pages mapped came from the file as opened
        with self._lock:
            self.read_bytes += data.numel()

    def tensors(self, plan: UnitPlan) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """The unit's own tensors read into fresh CPU tensors (used to put weights back)."""
        buffer = torch.empty(plan.nbytes, dtype=torch.uint8)
        for rng in plan.ranges:
            self.read(rng, buffer, rng.dst_offset, rng.dst_offset + rng.nbytes)
        for spec, offset in plan.own:
            yield spec, buffer[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape)

    def region(self, plan: UnitPlan) -> Callable[[int, int], torch.Tensor]:
        """`region(offset, nbytes)`: the bytes `plan`'s buffer would hold there, as views of private mappings of
        the files (no copy: pages come from the page cache when read)."""
        return _region(plan, self.map_lazily)

    def _crc(self, key: str, start: int, nbytes: int, crc: int = 0) -> int:
        fd = self._fd(key, False)
        end = start + nbytes
        while start < end:
            chunk = os.pread(fd, min(_CRC_CHUNK, end - start), start)
            if not chunk:
                raise RuntimeError(f"store file {self._paths[key]} is truncated: byte {start} is past its end")
            crc = zlib.crc32(chunk, crc)
            start += len(chunk)
        return crc

    def source_files(self) -> list[str]:
        return list(self._paths.values())

    def close(self) -> None:
        for table in (self._fds, self._direct_fds):
            for fd in table.values():
                os.close(fd)
            table.clear()


class NvmeStore(_FileStore):
    """Unit files in a directory, with a manifest written last (see the module docstring)."""

    def __init__(
        self,
        path: str,
        plans: list[UnitPlan],
        source: TensorSource | None,
        fingerprint: dict,
        *,
        direct_io: bool = False,
        verify: bool = True,
        writer: bool = True,
        progress: bool = True,
    ):
        """`writer=False` only opens a store another process writes (several processes share one directory)."""
        path = os.path.abspath(path)
        paths = {plan.key: os.path.join(path, f"{plan.key}.safetensors") for plan in plans if plan.own_nbytes}
        super().__init__(path, paths, {}, direct_io)
        self.manifest = {
            "format": STORE_FORMAT,
            "fingerprint": fingerprint,
            "units": [
                {
                    "key": plan.key,
                    "name": plan.name,
                    "tensors": [[s.name, SAFETENSORS_DTYPES[s.dtype], list(s.shape), off] for s, off in plan.own],
                }
                for plan in plans
                if plan.own_nbytes
            ],
        }
        check_writable_dir(self.path)
        self.lock = StoreLock(self.path)
        try:
            self._open(plans, source, verify, writer, progress)
            self._record_identities()
            for key, file_path in self._paths.items():
                self._data_start[key] = read_safetensors_header(file_path)[0]
        except BaseException:
            self.close()
            raise

    def _open(self, plans: list[UnitPlan], source: TensorSource | None, verify: bool, writer: bool, progress: bool):
        if writer and self.lock.try_exclusive():
            removed = remove_leftovers(self.path)
            if removed:
                logger.info(f"Removed what an interrupted writer left in {self.path}: {', '.join(removed)}")
            existing = self._load_manifest()
            if existing is not None and self._same_layout(existing):
                logger.info(f"Reusing the NVMe store in {self.path}")
                self._check(existing, verify, progress)
            else:
                if existing is not None:
                    logger.warning(f"The NVMe store in {self.path} holds other weights (stale): rebuilding it")
                if source is None:
                    raise RuntimeError(f"no valid NVMe store in {self.path} and no weights to write one from")
                self._write(plans, source, progress)
            self.lock.record_owner(f"{len(self._paths)} unit files")
            self.lock.shared()  # from now on other models of the same weights may read it too
            return
        # another model holds the directory (or this process reads what another rank wrote): wait for a writer to
        # finish, then read the store only if it holds these weights
        owner = self.lock.owner()
        self.lock.shared(wait=True)
        existing = self._load_manifest()
        if existing is None or not self._same_layout(existing):
            if not writer:
                raise RuntimeError(
                    f"no valid NVMe store for this model in {self.path} (was it written by another process?)"
                )
            raise RuntimeError(
                f"nvme_path ({self.path}) is in use by another offloaded model ({owner}) holding other weights: a "
                f"store has one owner. Use another nvme_path, or disable_offload the other model first"
            )
        self._check(existing, verify, progress)

    # -- building -------------------------------------------------------------------------------------------------

    def _load_manifest(self) -> dict | None:
        manifest_path = os.path.join(self.path, MANIFEST)
        try:
            fd = os.open(manifest_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            logger.warning(f"Ignoring the unreadable store manifest {manifest_path}: {err.strerror}")
            return None
        try:
            with os.fdopen(fd) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as err:
            logger.warning(f"Ignoring the unreadable store manifest {manifest_path}: {err}")
            return None
        if not isinstance(manifest, dict):
            logger.warning(f"Ignoring the store manifest {manifest_path}: not a JSON object")
            return None
        return manifest

    def _complete(self, manifest: dict) -> bool:
        """Whether the manifest records the size and the checksum of every unit file."""
        files = manifest.get("files")
        if not isinstance(files, dict):
            return False
        for key in self._paths:
            entry = files.get(key)
            if not isinstance(entry, dict):
                return False
            if not all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) for k in ("size", "crc32")):
                return False
        return True

    def _same_layout(self, existing: dict) -> bool:
        same = all(existing.get(k) == self.manifest[k] for k in ("format", "fingerprint", "units"))
        if same and not self._complete(existing):
            logger.warning(f"The NVMe store manifest in {self.path} does not record every file's size and checksum")
            return False
        return same

    def _check(self, manifest: dict, verify: bool, progress: bool) -> None:
        files = manifest["files"]
        self.manifest["files"] = files
        for key, file_path in self._paths.items():
            try:
                st = os.stat(file_path, follow_symlinks=False)
            except OSError as err:
                raise RuntimeError(f"NVMe store file {file_path} is missing: delete {self.path} to rebuild") from err
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(
                    f"NVMe store file {file_path} is not a regular file (a link?): delete {self.path} to rebuild"
                )
            if st.st_size != files[key]["size"]:
                raise RuntimeError(
                    f"NVMe store file {file_path} has {st.st_size} bytes, its manifest says {files[key]['size']}: the "
                    f"file is truncated or was changed; delete {self.path} to rebuild the store"
                )
        if not verify:
            return
        total = sum(files[k]["size"] for k in self._paths)
        with progress_bar(
            total=total, unit="B", unit_scale=True, desc="Verifying the NVMe store", enabled=progress
        ) as bar:
            for key, file_path in self._paths.items():
                crc = crc32_file(file_path, bar)
                if crc != files[key]["crc32"]:
                    raise RuntimeError(
                        f"NVMe store file {file_path} fails its checksum (crc32 {crc:08x}, manifest "
                        f"{files[key]['crc32']:08x}): the file is corrupted; delete {self.path} to rebuild the store"
                    )

    def _remove_unit_files(self) -> None:
        for entry in os.scandir(self.path):
            if _UNIT_FILE.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)

    def _write(self, plans: list[UnitPlan], source: TensorSource, progress: bool) -> None:
        manifest_path = os.path.join(self.path, MANIFEST)
        if os.path.lexists(manifest_path):
            os.remove(manifest_path)  # from here on the directory holds no valid store until the new manifest lands
        self._remove_unit_files()  # the old store's files, including those the new one has no use for
        needed = sum(len(_safetensors_header(p)) + p.own_nbytes for p in plans if p.own_nbytes)
        free = shutil.disk_usage(self.path).free
        if needed > free:
            raise RuntimeError(
                f"the NVMe store needs {needed / 2**30:.2f} GiB but {self.path} has {free / 2**30:.2f} GiB free"
            )
        files = {}
        try:
            with progress_bar(
                total=needed, unit="B", unit_scale=True, desc="Writing the NVMe store", enabled=progress
            ) as bar:
                for plan in plans:
                    if plan.own_nbytes:
                        files[plan.key] = self._write_unit(plan, source, bar)
            self.manifest["files"] = files
            data = json.dumps(self.manifest).encode()
            self._write_file(MANIFEST, [data])
        except BaseException:
            self._remove_unit_files()  # a store without its manifest is of no use: give the space back
            raise
        _sync_directory(self.path)

    def _write_unit(self, plan: UnitPlan, source: TensorSource, bar) -> dict:
        header = _safetensors_header(plan)
        crc = zlib.crc32(header)

        def pieces() -> Iterator:
            nonlocal crc
            yield header
            end = 0
            for (spec, offset), tensor in zip(plan.own, source(plan), strict=True):
                if offset > end:
                    pad = bytes(offset - end)
                    crc = zlib.crc32(pad, crc)
                    yield pad
                end = offset + spec.nbytes
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise RuntimeError(
                        f"{spec.name}: the source gave {tuple(tensor.shape)} {tensor.dtype}, the store expects "
                        f"{spec.shape} {spec.dtype}"
                    )
                data = tensor_bytes(tensor.cpu())
                crc = crc32_tensor(data, crc)
                yield memoryview(data.numpy())
            if plan.own_nbytes > end:
                pad = bytes(plan.own_nbytes - end)
                crc = zlib.crc32(pad, crc)
                yield pad

        size = self._write_file(os.path.basename(self._paths[plan.key]), pieces(), bar)
        return {"size": size, "crc32": crc}

    def _write_file(self, name: str, pieces, bar=None) -> int:
        """Write `pieces` to `name` in the store directory: into a new file with a unique name (created exclusively,
        no link followed), made read-only, synced, then renamed over `name`. Returns its size."""
        final = os.path.join(self.path, name)
        fd, tmp = temporary_file(self.path, name)
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for piece in pieces:
                    f.write(piece)
                    nbytes = piece.nbytes if isinstance(piece, memoryview) else len(piece)
                    size += nbytes
                    if bar is not None:
                        bar.update(nbytes)
                f.flush()
                os.fchmod(f.fileno(), 0o444)  # the store's files are never written again: read-only
                os.fsync(f.fileno())
            os.replace(tmp, final)  # replaces a link planted at `final`, never writes through it
        except OSError as err:
            _remove_quietly(tmp)
            hint = " (out of space)" if err.errno == errno.ENOSPC else ""
            raise RuntimeError(f"writing the NVMe store file {final} failed{hint}: {err.strerror}") from err
        except BaseException:
            _remove_quietly(tmp)
            raise
        return size

    def verify(self, plan: UnitPlan) -> None:
        """Check the CRC32 of every store file `plan` reads (its own unit's file, and the files of tied tensors it
        borrows) against the manifest."""
        self._verify_files({rng.source for rng in plan.ranges})

    def verify_all(self, plans: list[UnitPlan]) -> None:
        """`verify` of every plan, each file read once (a tied tensor's file is read by two plans)."""
        self._verify_files({rng.source for plan in plans for rng in plan.ranges})

    def _verify_files(self, keys: set[str]) -> None:
        for key in sorted(keys):
            expected = self.manifest["files"][key]["crc32"]
            crc = self._crc(key, 0, self.manifest["files"][key]["size"])
            self.check_identity(key)
            if crc != expected:
                raise RuntimeError(
                    f"NVMe store file {self._paths[key]} fails its checksum (crc32 {crc:08x}, manifest "
                    f"{expected:08x}): its bytes changed (a bad page, or another process wrote it) and are not used; "
                    f"delete {self.path} to rebuild the store"
                )

    def close(self) -> None:
        super().close()
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.close()


class CheckpointStore(_FileStore):
    """Ranges read straight from a checkpoint's safetensors shards (`ReadRange.source` is the shard's path).

    The shards are the user's: only their identities are checked on each read. With `checksums`, the CRC32 of each
    unit's ranges is computed when the store opens (one read of the checkpoint) and `verify` compares with it."""

    follow_links = True  # the Hub cache's snapshot files are links to its blobs

    def __init__(self, files: list[str], plans: list[UnitPlan], checksums: bool = False, progress: bool = True):
        paths = {path: path for path in files}
        super().__init__(os.path.dirname(files[0]) if files else "", paths, dict.fromkeys(files, 0), False)
        self._record_identities()
        self.checksums: dict[str, int] = {}
        if checksums:
            total = sum(plan.nbytes for plan in plans)
            with progress_bar(
                total=total, unit="B", unit_scale=True, desc="Checksumming the checkpoint", enabled=progress
            ) as bar:
                for plan in plans:
                    self.checksums[plan.key] = self._ranges_crc(plan)
                    bar.update(plan.nbytes)

    def _describe(self, key: str) -> str:
        return "checkpoint shard"

    def _advice(self) -> str:
        return "Load the model again (load_offloaded) once the checkpoint is complete"

    def _ranges_crc(self, plan: UnitPlan) -> int:
        crc = 0
        for rng in plan.ranges:
            crc = self._crc(rng.source, rng.src_offset, rng.nbytes, crc)
        return crc

    def verify_all(self, plans: list[UnitPlan]) -> None:
        """`verify` of every plan (the checksums are per plan)."""
        for plan in plans:
            self.verify(plan)

    def verify(self, plan: UnitPlan) -> None:
        """Check the identity of every shard `plan` reads, and, when checksums were taken at open, its bytes."""
        sources = sorted({rng.source for rng in plan.ranges})
        for source in sources:
            self.check_identity(source)
        expected = self.checksums.get(plan.key)
        if expected is not None:
            crc = self._ranges_crc(plan)
            for source in sources:
                self.check_identity(source)
            if crc != expected:
                raise RuntimeError(
                    f"the bytes of unit {plan.name} in the checkpoint shards {', '.join(sources)} changed since the "
                    f"store opened them (crc32 {crc:08x}, was {expected:08x}) and are not used; {self._advice()}"
                )


def _sync_directory(path: str) -> None:
    """Make the renames in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the renames are still atomic
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_tensor(store: CpuStore | _FileStore, plans: list[UnitPlan], name: str) -> torch.Tensor:
    """One tensor of a unit's own region, read from `store` into a fresh CPU tensor (set-up, not counted as traffic)."""
    spec, offset, plan = next((s, o, p) for p in plans for s, o in p.own if s.name == name)
    data = torch.empty(spec.nbytes, dtype=torch.uint8)
    store.read(ReadRange(plan.key, offset, 0, spec.nbytes), data, 0, spec.nbytes)
    store.read_bytes -= spec.nbytes
    return data.view(spec.dtype).view(spec.shape)


def open_nvme_store(
    path: str,
    plans: list[UnitPlan],
    source: TensorSource | None,
    fingerprint: dict,
    group=None,
    *,
    direct_io: bool = False,
    verify: bool = True,
    device: torch.device | None = None,
) -> NvmeStore:
    """The NVMe store of `plans` in `path`, written from `source` unless a valid one is there. With several processes
    (`group`), rank 0 writes (or checks) it, then the others open it read-only; a failure on any rank is raised on
    every rank (`collective.raise_together`), never left for the others to wait on."""
    if group is None:
        return NvmeStore(path, plans, source, fingerprint, direct_io=direct_io, verify=verify)
    flags = flag_device(group, device or torch.device("cpu"))
    store, error = None, None
    if group.rank() == 0:
        try:
            store = NvmeStore(path, plans, source, fingerprint, direct_io=direct_io, verify=verify)
        except Exception as err:  # raised on every rank just below
            error = err
    raise_together(group, error, flags, f"opening the NVMe store in {path}")
    if store is None:
        try:
            store = NvmeStore(
                path, plans, None, fingerprint, direct_io=direct_io, verify=False, writer=False, progress=False
            )
        except Exception as err:  # raised on every rank just below
            error = err
    try:
        raise_together(group, error, flags, f"opening the NVMe store in {path} read-only")
    except BaseException:
        if store is not None:
            store.close()
        raise
    return store
