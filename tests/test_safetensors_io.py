"""Our streaming safetensors reader and writer against the reference safetensors library."""

from __future__ import annotations

import json
import struct
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.errors import BadInputError
from qconvert.safetensors_io import ShardFile, TensorReader, TensorSpec, file_digest, read_header, shard_regions

TENSORS = {
    "a.bf16_odd": torch.randn(3, 5).to(torch.bfloat16),  # 30 bytes: would misalign what follows
    "b.int64": torch.arange(7, dtype=torch.int64),
    "c.int32": torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32),
    "d.fp8": torch.randn(2, 16).to(torch.float8_e4m3fn),
    "e.fp32": torch.randn(1, 9),
    "f.int8": torch.randint(-128, 127, (33,), dtype=torch.int8),
    "g.empty": torch.empty(0, 4, dtype=torch.float16),
    "h.scalar": torch.tensor(3.5, dtype=torch.float32),
}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_written_shards_read_back_with_safe_open(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]
    shard = ShardFile(path, specs)
    for name in reversed(list(TENSORS)):  # any order: offsets are fixed up front
        shard.write(name, TENSORS[name])
    shard.close()
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(_bytes(got), _bytes(tensor))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + header_len) % 8 == 0


def test_reader_matches_safe_open_and_copies_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    save_file(TENSORS, src)
    header = read_header(src)
    assert set(header.tensors) == set(TENSORS)
    dst = tmp_path / "dst.safetensors"
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in header.tensors.values()]
    shard = ShardFile(dst, specs)
    with TensorReader() as reader:
        for info in header.tensors.values():
            assert torch.equal(_bytes(reader.read(info)), _bytes(TENSORS[info.name]))
            reader.copy_into(info, shard.fd, shard.position(info.name))
            shard.mark_written(info.name)
    shard.close()
    with safe_open(dst, "pt") as f:
        for name, tensor in TENSORS.items():
            assert torch.equal(_bytes(f.get_tensor(name)), _bytes(tensor))


def test_digest_taken_while_writing_is_the_files(tmp_path: Path) -> None:
    """The journal digest hashed as tensors are written (in memory, or read back after a file-to-file copy)
    is the one computed from the file over the planned regions; any changed byte or size changes it."""
    src = tmp_path / "src.safetensors"
    save_file(TENSORS, src)
    header = read_header(src)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]
    regions = shard_regions(specs)
    assert regions[0][0] == 0 and all(a + n == b for (a, n), (b, _) in pairwise(regions))
    path = tmp_path / "out.safetensors"
    shard = ShardFile(path, specs, digest=True)
    copied, hashed_back = {"b.int64", "g.empty"}, {"c.int32", "d.fp8"}
    with TensorReader() as reader:
        for name in reversed(list(TENSORS)):
            if name in copied:
                reader.copy_into(header.tensors[name], shard.fd, shard.position(name))
                shard.mark_written(name)
            elif name in hashed_back:  # as the engine writes from its GPU arena: in pieces, hashed after
                data = memoryview(TENSORS[name].contiguous().reshape(-1).view(torch.uint8).numpy())
                for start in reversed(range(0, len(data), 3)):  # pieces of 3 bytes, out of order
                    shard.write_range(name, data[start : start + 3], start)
                assert name in shard.pending
                shard.mark_written(name)
            else:
                shard.write(name, TENSORS[name])
    digest = shard.digest()
    shard.close()
    assert regions[-1][0] + regions[-1][1] == path.stat().st_size
    assert file_digest(path, regions) == digest
    plain = ShardFile(tmp_path / "plain.safetensors", specs)  # no digest kept: read back instead
    for name in TENSORS:
        plain.write(name, TENSORS[name])
    assert plain.digest() == digest
    plain.close()
    raw = bytearray(path.read_bytes())
    for index in (3, regions[2][0], len(raw) - 1):  # header, a tensor, the last byte
        changed = raw.copy()
        changed[index] ^= 1
        path.write_bytes(bytes(changed))
        assert file_digest(path, regions) != digest
    path.write_bytes(bytes(raw) + b"\0")
    assert file_digest(path, regions) is None
    assert file_digest(tmp_path / "missing", regions) is None


def test_unwritten_tensor_is_an_error(tmp_path: Path) -> None:
    shard = ShardFile(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(AssertionError, match="never written"):
        shard.close()
    shard.abort()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:4], "too short"),
        (lambda raw: struct.pack("<Q", 10**7) + raw[8:], "truncated"),
        (lambda raw: raw[:8] + b"#" + raw[9:], "not valid JSON"),
        (lambda raw: raw[:-10], "truncated"),
    ],
)
def test_damaged_headers_are_reported_with_the_file(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(BadInputError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_overlapping_tensors_are_rejected(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(BadInputError, match="overlap"):
        read_header(path)
