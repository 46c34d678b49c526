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

import hashlib
import json
import math
import os
import stat
import struct
import threading
from collections.abc import Callable
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


# Bits per element of every dtype the reference reader knows (some have no torch dtype: we refuse
# those after the structural checks, so that a file's validity is judged exactly as the reference does).
REFERENCE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_USIZE_MAX = 2**64 - 1
_MAX_JSON_DEPTH = 127  # serde_json's recursion limit, as the reference reader applies it
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


class _Object(dict):
    """A JSON object that remembers which keys it saw twice (json keeps only the last)."""

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        seen: set[str] = set()
        self.repeated = {k for k, _ in pairs if k in seen or seen.add(k)}  # type: ignore[func-returns-value]


class _Negative(int):
    """An integer written with a minus sign (``-0`` included): never a valid size or offset."""


def _parse_int(text: str) -> int:
    return _Negative(int(text)) if text.startswith("-") else int(text)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def special_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (a FIFO would block forever, a device never ends), or None.

    Uses ``stat`` only: nothing is opened for reading."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    return f"is {kind}, not a regular file; refusing to read it"


def open_regular(path: Path) -> int:
    """A read-only descriptor on ``path``, which must be a regular file (checked before and after opening:
    O_NONBLOCK keeps a FIFO swapped in between from blocking the open)."""
    problem = special_file_problem(path)
    if problem:
        raise BadInputError(f"{path}: {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadInputError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInputError(f"{path}: is not a regular file; refusing to read it")
    os.set_blocking(fd, True)
    return fd


def _read_exact(fd: int, count: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < count:
        chunk = os.pread(fd, min(count - done, 1 << 26), offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_header(path: Path) -> Header:
    """Parse and validate the header of ``path``; raises :class:`BadInputError` naming the file.

    A file is accepted exactly when the reference ``safetensors`` reader accepts it (the tests check this
    on generated headers), with two deliberate refusals more: a tensor name given twice (the reference keeps
    the last one silently) and a dtype torch cannot hold."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        prefix = _read_exact(fd, 8, 0)
        if len(prefix) < 8:
            raise BadInputError(f"{path}: not a safetensors file ({size} bytes, too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES and 8 + header_len <= size:  # whole, but more than any reader takes
            raise BadInputError(f"{path}: header is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit of "
                                "safetensors readers")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise BadInputError(
                f"{path}: corrupt or truncated safetensors file "
                f"(header claims {header_len} bytes, file has {size})"
            )
        raw = _read_exact(fd, header_len, 8)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(raw) < header_len:
        raise BadInputError(f"{path}: truncated while reading its header")
    header = _parse_json(path, raw)
    metadata = _metadata(path, header)
    data_start = 8 + header_len
    entries = sorted(
        ((name, _entry(path, name, entry)) for name, entry in header.items() if name != "__metadata__"),
        key=lambda item: (item[1][2], item[1][3]),
    )
    position = 0
    for name, (code, shape, begin, end) in entries:
        if begin != position or end < begin:
            raise BadInputError(
                f"{path}: corrupt header, tensor {name} starts at data byte {begin} but the previous "
                f"tensor ends at {position} (gaps, overlaps and reordering are not allowed)"
            )
        position = end
        nbits = _nelements(path, name, shape) * REFERENCE_BITS[code]
        if nbits > _USIZE_MAX:
            raise BadInputError(f"{path}: corrupt header, tensor {name} shape {shape} is too large")
        if nbits % 8:
            raise BadInputError(f"{path}: corrupt header, tensor {name} does not end on a byte boundary")
        if end - begin != nbits // 8:
            raise BadInputError(
                f"{path}: corrupt header, tensor {name} spans {end - begin} bytes but its shape needs {nbits // 8}"
            )
    if data_start + position != size:
        if data_start + position > size:
            raise BadInputError(
                f"{path}: truncated, its tensors end at byte {data_start + position} but the file has {size}"
            )
        raise BadInputError(
            f"{path}: corrupt safetensors file, {size - data_start - position} bytes after the last tensor"
        )
    tensors: dict[str, TensorInfo] = {}
    for name, (code, shape, begin, end) in entries:
        dtype = DTYPES.get(code)
        if dtype is None:
            raise BadInputError(f"{path}: tensor {name} has dtype {code}, which qconvert cannot handle")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    return Header(tensors, metadata)


def _parse_json(path: Path, raw: bytes) -> _Object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: corrupt safetensors header (not UTF-8: {exc.reason})") from exc
    try:
        header = json.loads(text, object_pairs_hook=_Object, parse_int=_parse_int, parse_constant=_reject_constant)
    except RecursionError:
        raise BadInputError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError included
        raise BadInputError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: corrupt safetensors header (not a JSON object)")
    problem = _json_problem(header)
    if problem:
        raise BadInputError(f"{path}: corrupt safetensors header ({problem})")
    if "__metadata__" in header.repeated:
        raise BadInputError(f"{path}: corrupt safetensors header (__metadata__ given twice)")
    if header.repeated:
        name = sorted(header.repeated)[0]
        raise BadInputError(f"{path}: corrupt safetensors header, tensor {name} is named twice")
    return header


def _json_problem(root: object) -> str | None:
    """What the reference's JSON parser refuses but Python's accepts: nesting deeper than serde_json's
    limit, and strings holding a lone surrogate (not encodable as UTF-8)."""
    stack = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: list[object] = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return "a string holds a lone surrogate escape"
            continue
        if depth > _MAX_JSON_DEPTH:
            return "nested too deeply"
        stack.extend((child, depth + 1) for child in children)
    return None


def _metadata(path: Path, header: _Object) -> dict[str, str]:
    metadata = header.get("__metadata__")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    return dict(metadata)


def _is_usize(value: object) -> bool:
    return type(value) is int and 0 <= value <= _USIZE_MAX  # not bool, not _Negative (-0), not float


def _entry(path: Path, name: str, entry: object) -> tuple[str, list[int], int, int]:
    if not isinstance(entry, _Object):
        raise BadInputError(f"{path}: corrupt header entry for tensor {name} (not a JSON object)")
    for field in _ENTRY_FIELDS:
        if field not in entry:
            raise BadInputError(f"{path}: corrupt header entry for tensor {name} (no {field})")
        if field in entry.repeated:
            raise BadInputError(f"{path}: corrupt header entry for tensor {name} ({field} given twice)")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in REFERENCE_BITS:
        raise BadInputError(f"{path}: tensor {name} has unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
        raise BadInputError(f"{path}: corrupt header entry for tensor {name} (bad shape {shape!r:.80})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_usize(o) for o in offsets):
        raise BadInputError(f"{path}: corrupt header entry for tensor {name} (bad data_offsets {offsets!r:.80})")
    return code, shape, offsets[0], offsets[1]


def _nelements(path: Path, name: str, shape: list[int]) -> int:
    count = 1
    for dim in shape:  # in order, as the reference does: an overflow before a zero still counts
        count *= dim
        if count > _USIZE_MAX:
            raise BadInputError(f"{path}: corrupt header, tensor {name} shape {shape} is too large")
    return count


class TensorReader:
    """Reads tensors by :class:`TensorInfo`, keeping one descriptor per file open."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads and copies may run on several threads at once

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = open_regular(path)
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


def _shard_layout(specs: list[TensorSpec], metadata: dict[str, str] | None
                  ) -> tuple[bytes, list[TensorSpec], dict[str, int], int]:
    """A shard's header (length prefix included), its tensors in file order, their offsets from the end of
    the header, and the data size. Tensors are placed by decreasing item size (see :class:`ShardFile`)."""
    ordered = sorted(specs, key=lambda s: -s.dtype.itemsize)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        offsets[spec.name] = position
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, ordered, offsets, position


def shard_regions(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> list[tuple[int, int]]:
    """(start, length) of the header and of each tensor of the shard :class:`ShardFile` writes for
    ``specs``, in file order: together they cover the file exactly."""
    head, ordered, offsets, _ = _shard_layout(specs, metadata)
    return [(0, len(head))] + [(len(head) + offsets[spec.name], spec.nbytes) for spec in ordered]


_HASH_CHUNK = 4 << 20
_hash_buffers = threading.local()  # one reusable read buffer per thread that hashes file ranges


def _hash_range(fd: int, start: int, length: int) -> bytes | None:
    """sha256 of ``length`` bytes of ``fd`` from ``start`` (None if the file ends first)."""
    buffer = getattr(_hash_buffers, "buffer", None)
    if buffer is None:
        buffer = _hash_buffers.buffer = memoryview(bytearray(_HASH_CHUNK))
    digest = hashlib.sha256()
    done = 0
    while done < length:
        count = os.preadv(fd, [buffer[: min(_HASH_CHUNK, length - done)]], start + done)
        if count <= 0:
            return None
        digest.update(buffer[:count])  # hashlib lets other threads run meanwhile
        done += count
    return digest.digest()


def _combine(region_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(region_digests)).hexdigest()


def file_digest(path: Path, regions: list[tuple[int, int]]) -> str | None:
    """A shard's digest: the sha256 of the sha256 of each region (:func:`shard_regions`), in file order.

    Regions rather than one sha256 of the whole file, so that the writer threads can hash each tensor
    as they write it, in any order, instead of reading the whole shard back after its fsync. None when
    the file is missing or not exactly the size the regions cover."""
    digests = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        end = max((start + length for start, length in regions), default=0)
        if os.fstat(fd).st_size != end:
            return None
        for start, length in regions:
            digest = _hash_range(fd, start, length)
            if digest is None:
                return None
            digests.append(digest)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _combine(digests)


class ShardFile:
    """A safetensors file whose layout is fixed up front, so tensors can be written in any order.

    Tensors are placed by decreasing item size, which keeps every tensor aligned to its element
    size (as the reference writer does) without padding between tensors.

    With ``digest``, each tensor is hashed as it is written (``write``: the bytes in memory; ``mark_written``,
    for bytes copied file to file or written in pieces by ``write_range``: read back from this file's page cache),
    so that :meth:`digest` is ready as soon as the last tensor is written, without reading the shard back
    whole (see :func:`file_digest`).
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None,
                 digest: bool = False):
        self.path = path
        head, ordered, self.offsets, size = _shard_layout(specs, metadata)
        self.data_start = len(head)
        self.specs = {spec.name: spec for spec in specs}
        self._order = [spec.name for spec in ordered]
        self.pending = set(self.specs)
        # Called with the shard once its bytes are on disk (the writer checks its header and journals it).
        self.on_close: Callable[[ShardFile], None] | None = None
        self._digests: dict[str, bytes] | None = {"": hashlib.sha256(head).digest()} if digest else None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, head, 0)
        os.ftruncate(self.fd, self.data_start + size)

    def position(self, name: str) -> int:
        return self.data_start + self.offsets[name]

    def write(self, name: str, tensor: torch.Tensor, written: Callable[[int, int], None] | None = None) -> None:
        """Write ``name``'s bytes at their place and hash them from memory; ``written(position, nbytes)`` is
        called as soon as they are in the file (before they are hashed: the engine starts the disk's
        writeback there)."""
        self.check_planned(name, tensor)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        self.write_range(name, view, 0)
        if written is not None:
            written(self.position(name), len(view))
        if self._digests is not None:
            self._digests[name] = hashlib.sha256(view).digest()  # hashlib lets other threads run meanwhile
        self.pending.discard(name)

    def check_planned(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(
                f"{name}: planned {spec.dtype}{list(spec.shape)}, produced {tensor.dtype}{list(tensor.shape)}"
            )

    def write_range(self, name: str, data: memoryview, start: int) -> None:
        """Write ``data`` as bytes ``[start, start + len(data))`` of ``name``'s place: one piece of a tensor
        that several threads write at once (then :meth:`mark_written`), or the whole of it."""
        if start < 0 or start + len(data) > self.specs[name].nbytes:
            raise AssertionError(f"{name}: bytes {start}..{start + len(data)} lie outside the tensor")
        position = self.position(name) + start
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], position + done)

    def mark_written(self, name: str) -> None:
        """``name``'s bytes are in this file (put there by ``TensorReader.copy_into``, or in pieces by
        :meth:`write_range`): hash them back from the file if the shard keeps digests; the tensor is done."""
        if self._digests is not None:
            digest = _hash_range(self.fd, self.position(name), self.specs[name].nbytes)
            if digest is None:
                raise OSError(f"{self.path}: {name} reads back short")
            self._digests[name] = digest
        self.pending.discard(name)

    def digest(self) -> str:
        """:func:`file_digest` of this shard, once every tensor is written: from the hashes taken while
        writing when the shard was made with ``digest``, else by reading the file back."""
        if self.pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        if self._digests is None:
            regions = [(0, self.data_start)] + [(self.position(n), self.specs[n].nbytes) for n in self._order]
            found = file_digest(self.path, regions)
            if found is None:
                raise AssertionError(f"{self.path}: not the planned size")
            return found
        return _combine([self._digests[""]] + [self._digests[name] for name in self._order])

    def close(self) -> None:
        if self.pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.on_close is not None:
            self.on_close(self)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
