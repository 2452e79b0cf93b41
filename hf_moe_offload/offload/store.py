"""Weight stores: where every offloaded byte lives between two uses.

A model is cut into *units* (the embedding, each decoder block, the final norm, the head). Each unit's own tensors are
packed into one contiguous region, largest element size first so every tensor stays aligned to its dtype; a tensor
shared with an earlier unit (tied embeddings) is not stored twice, the later unit reads it from its owner's region.
A unit is fetched with a list of `ReadRange`s into one buffer whose layout is the unit's `UnitPlan`.

The experts of a MoE layer (the transformers v5 fused parameters `gate_up_proj`/`up_proj`, `down_proj` and their
biases, each `(num_experts, ...)`) are stored expert-major after the unit's dense tensors: expert `e`'s slices of every
fused parameter form one 4 KiB-aligned region, so fetching one expert is one read, and the whole layer is still one
region (read at once when every expert is wanted). In the safetensors files the slices are entries named
`<experts module>.<e>.<parameter>`.

- `CpuStore`: one arena (a uint8 tensor) per unit in host memory, page-locked when the execution device is CUDA.
- `NvmeStore`: one safetensors file per unit in a directory, the data starting on a 4 KiB boundary so the region can
  be read with `O_DIRECT`, plus `manifest.json` (layout, sizes, CRC32 checksums, the source's fingerprint) written
  last and atomically. A store is reused only when its manifest says it holds the same tensors from the same source
  and every file has its recorded size and checksum; without a manifest (an interrupted write) or with another
  source it is rebuilt. Tensors may also be read straight from a checkpoint's safetensors shards (no copy on disk).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

ALIGN = 4096
# Every tensor starts on a 64-byte boundary like torch's CPU allocations: kernels see the alignment they see in memory.
TENSOR_ALIGN = 64
STORE_FORMAT = 2  # 2: experts stored expert-major
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MAP_MERGE_GAP = 1 << 20  # map across gaps up to this size between ranges rather than map twice
MANIFEST = "manifest.json"

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def madvise(data: torch.Tensor, advice: int) -> None:
    """madvise(2) on the pages under the CPU tensor `data`, without the GIL (`mmap.madvise` holds it for the whole
    call: populating a unit's pages on an I/O thread would stop the computing thread). `MADV_DONTNEED` covers only the
    pages entirely inside `data` (a neighbour's bytes are never dropped); other advice every page it touches."""
    start, end = data.data_ptr(), data.data_ptr() + data.numel() * data.element_size()
    page = mmap.PAGESIZE
    if advice == mmap.MADV_DONTNEED:
        start, end = align_up(start, page), end - end % page
    else:
        start, end = start - start % page, align_up(end, page)
    if end > start and _libc.madvise(start, end - start, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def align_up(n: int, alignment: int = ALIGN) -> int:
    return -(-n // alignment) * alignment


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a CPU tensor as a flat uint8 tensor (a view when the tensor is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class ReadRange:
    """`nbytes` at `src_offset` of `source` (a unit key or a checkpoint file) go to `dst_offset` of the unit buffer."""

    source: str
    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertGroup:
    """The experts of one MoE layer: the fused `(num_experts, ...)` parameters of its experts module."""

    module: str
    params: tuple[TensorSpec, ...]

    @property
    def num_experts(self) -> int:
        return self.params[0].shape[0]


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts of one group sit in their unit's region: expert `e` at `offset + e * stride`, its slice of
    parameter `i` at `param_offsets[i]` inside that."""

    group: ExpertGroup
    offset: int
    stride: int
    nbytes: int  # bytes of one expert's slices (<= stride)
    param_offsets: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return self.group.num_experts

    def piece(self, expert: int, param: int) -> TensorSpec:
        spec = self.group.params[param]
        attr = spec.name.rpartition(".")[2]
        return TensorSpec(f"{self.group.module}.{expert}.{attr}", spec.dtype, spec.shape[1:])

    def views(self, buffer: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The fused parameters of `count` experts stored back to back (`stride` apart) in the uint8 `buffer`, as
        `(count, ...)` views (strided over the experts, each expert's slice contiguous)."""
        rows = buffer[: count * self.stride].view(count, self.stride)
        views = []
        for spec, start in zip(self.group.params, self.param_offsets, strict=True):
            piece = rows[:, start : start + spec.nbytes // spec.shape[0]]
            views.append(piece.view(spec.dtype).view(count, *spec.shape[1:]))
        return views


@dataclass
class UnitPlan:
    """Where each tensor of one unit sits in its fetch buffer, and the reads that fill that buffer."""

    index: int
    name: str
    tensors: list[tuple[TensorSpec, int]] = field(default_factory=list)  # (spec, offset in the unit buffer)
    own: list[tuple[TensorSpec, int]] = field(default_factory=list)  # the tensors stored in this unit's region
    own_nbytes: int = 0
    nbytes: int = 0  # buffer bytes, 4 KiB aligned
    ranges: list[ReadRange] = field(default_factory=list)
    experts: list[ExpertLayout] = field(default_factory=list)  # MoE layers of the unit, in the buffer like the region
    pieces: dict[str, tuple[str, int]] = field(default_factory=dict)  # own expert slice -> (fused parameter, expert)
    dense: UnitPlan | None = None  # the same unit without its experts (fetched when experts come one by one)

    @property
    def key(self) -> str:
        return f"unit_{self.index:05d}"


def plan_units(
    units: list[tuple[str, list[TensorSpec]]], experts: dict[int, list[ExpertGroup]] | None = None
) -> list[UnitPlan]:
    """Lay out every unit: own tensors packed by decreasing element size, then the unit's experts (expert-major, see
    the module docstring), borrowed (tied) tensors after them. `experts` maps a unit index to its MoE layers."""
    experts = experts or {}
    owner: dict[str, tuple[UnitPlan, int]] = {}
    plans = []
    for index, (name, specs) in enumerate(units):
        plan = UnitPlan(index=index, name=name)
        own = [spec for spec in specs if spec.name not in owner]
        offset = 0
        for spec in sorted(own, key=lambda s: -s.dtype.itemsize):
            offset = align_up(offset, TENSOR_ALIGN)
            plan.own.append((spec, offset))
            plan.tensors.append((spec, offset))
            owner[spec.name] = (plan, offset)
            offset += spec.nbytes
        dense_nbytes = offset
        for group in experts.get(index, []):
            offset = align_up(offset)
            param_offsets, blob = [], 0
            for spec in group.params:
                blob = align_up(blob, TENSOR_ALIGN)
                param_offsets.append(blob)
                blob += spec.nbytes // spec.shape[0]
            layout = ExpertLayout(group, offset, align_up(blob), blob, tuple(param_offsets))
            plan.experts.append(layout)
            for expert in range(group.num_experts):
                for param, start in enumerate(param_offsets):
                    piece = layout.piece(expert, param)
                    plan.own.append((piece, offset + expert * layout.stride + start))
                    plan.pieces[piece.name] = (group.params[param].name, expert)
            offset += group.num_experts * layout.stride
        plan.own_nbytes = offset
        borrowed = [spec for spec in specs if spec.name not in {s.name for s in own}]
        _finish(plan, borrowed, owner)
        if plan.experts:
            plan.dense = UnitPlan(index=index, name=name, tensors=list(plan.tensors[: len(own)]))
            _finish(plan.dense, borrowed, owner, region_nbytes=dense_nbytes)
        plans.append(plan)
    return plans


def _finish(
    plan: UnitPlan, borrowed: list[TensorSpec], owner: dict[str, tuple[UnitPlan, int]], region_nbytes: int = -1
) -> None:
    """Add the reads of `plan`: its own region (the first `region_nbytes` of it), then each borrowed tensor."""
    nbytes = plan.own_nbytes if region_nbytes < 0 else region_nbytes
    if nbytes:
        plan.ranges.append(ReadRange(plan.key, 0, 0, nbytes))
    offset = align_up(nbytes)
    for spec in borrowed:
        src_plan, src_offset = owner[spec.name]
        plan.tensors.append((spec, offset))
        plan.ranges.append(ReadRange(src_plan.key, src_offset, offset, spec.nbytes))
        offset = align_up(offset + spec.nbytes)
    plan.nbytes = align_up(max(offset, 1))


def own_tensors(plan: UnitPlan, get: Callable[[str], torch.Tensor]) -> Iterator[torch.Tensor]:
    """The CPU tensors of `plan.own` in order, from `get(parameter name)`; an expert slice is cut from its fused
    parameter, which is fetched once per unit."""
    fused: dict[str, torch.Tensor] = {}
    for spec, _ in plan.own:
        piece = plan.pieces.get(spec.name)
        if piece is None:
            yield get(spec.name)
            continue
        name, expert = piece
        if name not in fused:
            fused[name] = get(name)
        yield fused[name][expert]


def assemble(plan: UnitPlan, pairs: Iterable[tuple[TensorSpec, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, CPU tensor) of a unit from the (spec, tensor) pairs of its own region: expert slices are put
    back together into their fused parameters."""
    fused: dict[str, torch.Tensor] = {}
    for spec, tensor in pairs:
        piece = plan.pieces.get(spec.name)
        if piece is None:
            yield spec.name, tensor
            continue
        name, expert = piece
        if name not in fused:
            group_spec = next(s for layout in plan.experts for s in layout.group.params if s.name == name)
            fused[name] = torch.empty(group_spec.shape, dtype=group_spec.dtype)
        fused[name][expert].copy_(tensor)
    yield from fused.items()


# A function giving the CPU tensors of a unit's own region, in the order of `plan.own`.
TensorSource = Callable[[UnitPlan], Iterable[torch.Tensor]]


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
        """`rng` as a uint8 tensor over a private mapping of its file, no page mapped yet: `populate` and
        `madvise(..., MADV_DONTNEED)` map and unmap parts of it (the mapping goes away with the last tensor viewing
        it; private: a write could never reach the file)."""
        path = self._paths[rng.source]
        start = self._data_start[rng.source] + rng.src_offset
        base = start - start % mmap.ALLOCATIONGRANULARITY
        fd = self._fd(rng.source, False)
        if os.fstat(fd).st_size < start + rng.nbytes:
            raise RuntimeError(
                f"NVMe store file {path} is truncated: byte {start + rng.nbytes - 1} is past its end; delete "
                f"{self.path} to rebuild the store"
            )
        mapping = mmap.mmap(
            fd, start + rng.nbytes - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base
        )
        return torch.frombuffer(mapping, dtype=torch.uint8, count=rng.nbytes, offset=start - base)

    def populate(self, data: torch.Tensor) -> None:
        """Map the pages under `data` (a view of a mapping) now, reading them from the file when they are not in the
        page cache (Linux >= 5.14; before, only a read-ahead hint)."""
        try:
            madvise(data, _MADV_POPULATE_READ)
        except OSError:
            madvise(data, mmap.MADV_WILLNEED)
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
            self._prepare_dir()
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

    def _prepare_dir(self) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise ValueError(f"nvme_path ({self.path}) cannot be created: {err.strerror}") from err
        if not os.path.isdir(self.path):
            raise ValueError(f"nvme_path ({self.path}) is not a directory")
        probe = os.path.join(self.path, f".write_probe_{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"0")
            os.remove(probe)
        except OSError as err:
            raise ValueError(f"nvme_path ({self.path}) is not writable: {err.strerror}") from err

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
