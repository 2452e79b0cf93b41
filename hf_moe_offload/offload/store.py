"""Weight stores: where every offloaded byte lives between two uses, and how it is read back.

- `CpuStore`: one arena (a uint8 tensor) per unit in host memory, page-locked when the execution device is CUDA.
- `NvmeStore`: one safetensors file per unit in a directory, the data starting on a 4 KiB boundary so the region can
  be read with `O_DIRECT`, plus `manifest.json` (layout, sizes, CRC32 checksums, the source's fingerprint) written
  last and atomically. A store is reused only when its manifest says it holds the same tensors from the same source
  and every file has its recorded size and checksum; without a manifest (an interrupted write) or with another
  source it is rebuilt.
- `CheckpointStore`: ranges read straight from a checkpoint's safetensors shards (no copy on disk).

The layout of each unit's region is `layout.py`'s; this module only reads and writes bytes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from . import pages
from .layout import ALIGN, SAFETENSORS_DTYPES, ReadRange, TensorSource, TensorSpec, UnitPlan, align_up, tensor_bytes


logger = logging.get_logger(__name__)

STORE_FORMAT = 2  # 2: experts stored expert-major
_MAP_MERGE_GAP = 1 << 20  # map across gaps up to this size between ranges rather than map twice
MANIFEST = "manifest.json"


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


def checkpoint_fingerprint(name: str, dtype: torch.dtype, files: list[str]) -> dict:
    """The fingerprint of a store written from checkpoint shards: the checkpoint's name, the dtype, and each shard's
    name, size and modification time."""
    return {
        "source": "checkpoint",
        "name": name,
        "dtype": str(dtype),
        "files": [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
    }


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

    def __init__(self, plans: list[UnitPlan], source: TensorSource, pin: bool = False, progress: bool = True):
        self.arenas: dict[str, torch.Tensor] = {}
        self.pinned = pin
        self.read_bytes = 0
        self._lock = threading.Lock()
        total = sum(plan.own_nbytes for plan in plans)
        with tqdm(total=total, unit="B", unit_scale=True, desc="Filling the CPU store", disable=not progress) as bar:
            for plan in plans:
                if not plan.own_nbytes:
                    continue
                arena = torch.empty(plan.own_nbytes, dtype=torch.uint8, pin_memory=pin)
                for (_, offset), tensor in zip(plan.own, source(plan), strict=True):
                    data = tensor_bytes(tensor)
                    arena[offset : offset + data.numel()].copy_(data)
                    bar.update(data.numel())
                self.arenas[plan.key] = arena

    def read(self, rng: ReadRange, dst: torch.Tensor, lo: int, hi: int) -> None:
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

    def close(self) -> None:
        self.arenas.clear()


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


class _FileStore:
    """Reads `ReadRange`s from files with `pread` (from I/O threads; `os.preadv` releases the GIL)."""

    name = "nvme"
    pinned = False
    in_memory = False
    mappable = True  # `map_runs`: pages mapped from the page cache instead of read into buffers

    def __init__(self, path: str, paths: dict[str, str], data_start: dict[str, int], direct_io: bool):
        self.path = path
        self.read_bytes = 0
        self.direct_io = direct_io
        self._paths = paths
        self._data_start = data_start
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int] = {}

    # -- reading --------------------------------------------------------------------------------------------------

    def _fd(self, key: str, direct: bool) -> int:
        table = self._direct_fds if direct else self._fds
        fd = table.get(key)
        if fd is None:
            with self._lock:
                fd = table.get(key)
                if fd is None:
                    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
                    try:
                        fd = os.open(self._paths[key], flags)
                    except OSError as err:
                        if direct and err.errno == errno.EINVAL:
                            logger.warning(f"{self.path} refuses O_DIRECT: reading through the page cache")
                            self.direct_io = False
                            return self._fd(key, False)
                        raise RuntimeError(f"cannot open NVMe store file {self._paths[key]}: {err.strerror}") from err
                    table[key] = fd
        return fd

    def read(self, rng: ReadRange, dst: torch.Tensor, lo: int, hi: int) -> None:
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
                raise RuntimeError(f"reading NVMe store file {self._paths[rng.source]} failed: {err.strerror}") from err
            if got == 0:
                raise RuntimeError(
                    f"NVMe store file {self._paths[rng.source]} is truncated: byte {src + done} is past its end; "
                    f"delete {self.path} to rebuild the store"
                )
            done += got
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
        if os.fstat(self._fd(run.source, False)).st_size < run.end:
            raise RuntimeError(
                f"NVMe store file {self._paths[run.source]} is truncated: byte {run.end - 1} is past its end; delete "
                f"{self.path} to rebuild the store"
            )
        self.populate(run.data)

    def map_lazily(self, rng: ReadRange) -> torch.Tensor:
        """`rng` as a uint8 tensor over a private mapping of its file, no page mapped yet (`populate` and
        `pages.drop` map and unmap parts of it)."""
        path = self._paths[rng.source]
        start = self._data_start[rng.source] + rng.src_offset
        fd = self._fd(rng.source, False)
        if os.fstat(fd).st_size < start + rng.nbytes:
            raise RuntimeError(
                f"NVMe store file {path} is truncated: byte {start + rng.nbytes - 1} is past its end; delete "
                f"{self.path} to rebuild the store"
            )
        return pages.map_file(fd, start, rng.nbytes)

    def populate(self, data: torch.Tensor) -> None:
        """Map the pages under `data` (a view of a mapping of this store) now, counted as read."""
        pages.populate(data)
        with self._lock:
            self.read_bytes += data.numel()

    def tensors(self, plan: UnitPlan) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """The unit's own tensors read into fresh CPU tensors (used to put weights back)."""
        buffer = torch.empty(plan.nbytes, dtype=torch.uint8)
        for rng in plan.ranges:
            self.read(rng, buffer, rng.dst_offset, rng.dst_offset + rng.nbytes)
        for spec, offset in plan.own:
            yield spec, buffer[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape)

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
        paths = {plan.key: os.path.join(path, f"{plan.key}.safetensors") for plan in plans if plan.own_nbytes}
        super().__init__(path, paths, {}, direct_io)
        manifest = {
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
        if writer:
            check_writable_dir(self.path)
            existing = self._load_manifest()
            if existing is not None and self._same_layout(existing, manifest):
                logger.info(f"Reusing the NVMe store in {path}")
                self._check(existing, verify, progress)
            else:
                if existing is not None:
                    logger.warning(f"The NVMe store in {path} holds other weights (stale): rebuilding it")
                if source is None:
                    raise RuntimeError(f"no valid NVMe store in {path} and no weights to write one from")
                self._write(plans, source, manifest, progress)
        else:
            existing = self._load_manifest()
            if existing is None or not self._same_layout(existing, manifest):
                raise RuntimeError(f"no valid NVMe store for this model in {path} (was it written by another process?)")
            self._check(existing, verify, progress)
        for key, file_path in self._paths.items():
            if key not in self._data_start:
                self._data_start[key] = read_safetensors_header(file_path)[0]

    # -- building -------------------------------------------------------------------------------------------------

    def _load_manifest(self) -> dict | None:
        try:
            with open(os.path.join(self.path, MANIFEST)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.warning(f"Ignoring the unreadable store manifest in {self.path}: {err}")
            return None

    @staticmethod
    def _same_layout(existing: dict, manifest: dict) -> bool:
        return all(existing.get(k) == manifest[k] for k in ("format", "fingerprint", "units"))

    def _check(self, manifest: dict, verify: bool, progress: bool) -> None:
        files = manifest.get("files", {})
        for key, file_path in self._paths.items():
            if key not in files:
                continue
            expected = files[key]
            try:
                size = os.path.getsize(file_path)
            except OSError as err:
                raise RuntimeError(f"NVMe store file {file_path} is missing: delete {self.path} to rebuild") from err
            if size != expected["size"]:
                raise RuntimeError(
                    f"NVMe store file {file_path} has {size} bytes, its manifest says {expected['size']}: the file is "
                    f"truncated or was changed; delete {self.path} to rebuild the store"
                )
        if not verify:
            return
        total = sum(files[k]["size"] for k in self._paths if k in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="Verifying the NVMe store", disable=not progress) as bar:
            for key, file_path in self._paths.items():
                if key not in files:
                    continue
                crc = 0
                with open(file_path, "rb", buffering=0) as f:
                    while chunk := f.read(64 << 20):
                        crc = zlib.crc32(chunk, crc)
                        bar.update(len(chunk))
                if crc != files[key]["crc32"]:
                    raise RuntimeError(
                        f"NVMe store file {file_path} fails its checksum (crc32 {crc:08x}, manifest "
                        f"{files[key]['crc32']:08x}): the file is corrupted; delete {self.path} to rebuild the store"
                    )

    def _write(self, plans: list[UnitPlan], source: TensorSource, manifest: dict, progress: bool) -> None:
        manifest_path = os.path.join(self.path, MANIFEST)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # from here on the directory holds no valid store until the new manifest lands
        needed = sum(len(_safetensors_header(p)) + p.own_nbytes for p in plans if p.own_nbytes)
        free = shutil.disk_usage(self.path).free
        if needed > free:
            raise RuntimeError(
                f"the NVMe store needs {needed / 2**30:.2f} GiB but {self.path} has {free / 2**30:.2f} GiB free"
            )
        files = {}
        with tqdm(total=needed, unit="B", unit_scale=True, desc="Writing the NVMe store", disable=not progress) as bar:
            for plan in plans:
                if not plan.own_nbytes:
                    continue
                final = self._paths[plan.key]
                tmp = final + ".tmp"
                try:
                    header = _safetensors_header(plan)
                    crc = 0
                    with open(tmp, "wb") as f:
                        f.write(header)
                        bar.update(len(header))
                        crc = zlib.crc32(header, crc)
                        end = 0
                        for (spec, offset), tensor in zip(plan.own, source(plan), strict=True):
                            if offset > end:
                                pad = bytes(offset - end)
                                f.write(pad)
                                crc = zlib.crc32(pad, crc)
                            end = offset + spec.nbytes
                            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                                raise RuntimeError(
                                    f"{spec.name}: the source gave {tuple(tensor.shape)} {tensor.dtype}, "
                                    f"the store expects {spec.shape} {spec.dtype}"
                                )
                            data = tensor_bytes(tensor.cpu())
                            f.write(memoryview(data.numpy()))
                            crc = crc32_tensor(data, crc)
                            bar.update(data.numel())
                        if plan.own_nbytes > end:
                            pad = bytes(plan.own_nbytes - end)
                            f.write(pad)
                            crc = zlib.crc32(pad, crc)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, final)
                except OSError as err:
                    _remove_quietly(tmp)
                    hint = " (out of space)" if err.errno == errno.ENOSPC else ""
                    raise RuntimeError(f"writing the NVMe store file {tmp} failed{hint}: {err.strerror}") from err
                except BaseException:
                    _remove_quietly(tmp)
                    raise
                files[plan.key] = {"size": os.path.getsize(final), "crc32": crc}
        manifest = dict(manifest, files=files)
        tmp = manifest_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, manifest_path)
        except OSError as err:
            _remove_quietly(tmp)
            raise RuntimeError(f"writing the NVMe store manifest {manifest_path} failed: {err.strerror}") from err


class CheckpointStore(_FileStore):
    """Ranges read straight from a checkpoint's safetensors shards (`ReadRange.source` is the shard's path)."""

    def __init__(self, files: list[str], direct_io: bool = False):
        paths = {path: path for path in files}
        super().__init__(os.path.dirname(files[0]) if files else "", paths, dict.fromkeys(files, 0), direct_io)


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
) -> NvmeStore:
    """The NVMe store of `plans` in `path`, written from `source` unless a valid one is there. With several processes
    (`group`), rank 0 writes (or checks) it while the others wait at a barrier, then open it read-only."""
    writer = group is None or group.rank() == 0
    store = None
    if writer:
        store = NvmeStore(path, plans, source, fingerprint, direct_io=direct_io, verify=verify)
    if group is not None:
        torch.distributed.barrier(group=group)
    if store is None:
        store = NvmeStore(
            path, plans, None, fingerprint, direct_io=direct_io, verify=False, writer=False, progress=False
        )
    return store
