"""The safetensors file format, read and written one tensor at a time.

We parse headers ourselves and move tensor bytes with ``pread``/``pwrite`` rather than through
``safetensors.safe_open``: safe_open memory-maps the whole shard, and every page a quantizer touches
stays resident until the file is closed, so peak RSS would grow with the shard. Here a tensor's bytes
live in one buffer that is freed when the tensor is done, and tensors that pass through unchanged are
copied file to file without entering Python at all. The files we write are checked against the
reference ``safetensors`` reader in the tests.

Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(offsets relative to the end of the header), then the data.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import BadInputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the reference reader's own limit
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: enough to read it without opening anything else."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute position of the first data byte in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_code(self) -> str:
        return DTYPE_CODES[self.dtype]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and validate the header of ``path``; raises :class:`BadInputError` naming the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadInputError(f"{path}: not a safetensors file ({size} bytes, too short)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise BadInputError(
                    f"{path}: corrupt or truncated safetensors file "
                    f"(header claims {header_len} bytes, file has {size})"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = [_tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.offset)
    for before, after in itertools.pairwise(tensors):
        if after.offset < before.offset + before.nbytes:
            raise BadInputError(f"{path}: corrupt header, tensors {before.name} and {after.name} overlap")
    return Header({t.name: t for t in tensors}, metadata if isinstance(metadata, dict) else {})


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BadInputError(f"{path}: corrupt header entry for tensor {name}")
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise BadInputError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
    ):
        raise BadInputError(f"{path}: corrupt header entry for tensor {name}")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != expected:
        raise BadInputError(
            f"{path}: corrupt header, tensor {name} spans {end - begin} bytes but its shape needs {expected}"
        )
    if end > data_size:
        raise BadInputError(
            f"{path}: truncated, tensor {name} ends at byte {data_start + end} "
            f"but the file has {data_start + data_size}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, expected)


class TensorReader:
    """Reads tensors by :class:`TensorInfo`, keeping one descriptor per file open."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads and copies may run on several threads at once

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise BadInputError(f"{path}: cannot open ({exc.strerror})") from exc
            return self._fds[path]

    def read(self, info: TensorInfo, pin_memory: bool = False) -> torch.Tensor:
        """A fresh tensor holding ``info``'s data (never a view of the file); ``pin_memory`` reads it
        straight into page-locked memory, from which a GPU copies without a staging copy."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        view = memoryview(buffer.numpy())
        fd = self._fd(info.file)
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n == 0:
                raise BadInputError(f"{info.file}: truncated while reading tensor {info.name}")
            done += n
        return buffer.view(info.dtype).reshape(info.shape)

    def read_into(self, info: TensorInfo, out: memoryview, start: int = 0, length: int | None = None) -> None:
        """Read bytes ``[start, start + length)`` of ``info``'s data into ``out`` (a preallocated
        buffer, which may be one chunk of a larger read split across threads)."""
        length = info.nbytes - start if length is None else length
        fd = self._fd(info.file)
        done = 0
        while done < length:
            n = os.preadv(fd, [out[done:length]], info.offset + start + done)
            if n == 0:
                raise BadInputError(f"{info.file}: truncated while reading tensor {info.name}")
            done += n

    def copy_into(self, info: TensorInfo, dst_fd: int, dst_offset: int) -> None:
        """Copy ``info``'s bytes into another file without materializing the tensor."""
        src_fd = self._fd(info.file)
        done = 0
        try:
            while done < info.nbytes:
                n = os.copy_file_range(
                    src_fd, dst_fd, min(_COPY_CHUNK, info.nbytes - done),
                    info.offset + done, dst_offset + done,
                )
                if n == 0:
                    raise BadInputError(f"{info.file}: truncated while reading tensor {info.name}")
                done += n
        except OSError:
            # Some filesystems refuse copy_file_range; a bounded-buffer copy does the same job.
            while done < info.nbytes:
                chunk = os.pread(src_fd, min(_COPY_CHUNK, info.nbytes - done), info.offset + done)
                if not chunk:
                    raise BadInputError(f"{info.file}: truncated while reading tensor {info.name}") from None
                os.pwrite(dst_fd, chunk, dst_offset + done)
                done += len(chunk)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, dtype and shape, known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardFile:
    """A safetensors file whose layout is fixed up front, so tensors can be written in any order.

    Tensors are placed by decreasing item size, which keeps every tensor aligned to its element
    size (as the reference writer does) without padding between tensors.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        ordered = sorted(specs, key=lambda s: -s.dtype.itemsize)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        position = 0
        for spec in ordered:
            header[spec.name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [position, position + spec.nbytes],
            }
            self.offsets[spec.name] = position
            position += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.specs = {spec.name: spec for spec in specs}
        self.pending = set(self.specs)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.data_start + position)

    def position(self, name: str) -> int:
        return self.data_start + self.offsets[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(
                f"{name}: planned {spec.dtype}{list(spec.shape)}, produced {tensor.dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.position(name) + done)
        self.pending.discard(name)

    def mark_written(self, name: str) -> None:
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
