"""The hostile-input corpus: each case damages (or disguises) a real tiny checkpoint, names the
command to run, and says how qconvert must answer. tests/test_hostile.py runs them.

A case's ``setup`` gets a :class:`Ctx` (a private copy of the model, the output path, a scratch folder)
and returns the command line. Expected: ``code`` (0, 2, ...), ``needles`` that must appear in the one
stderr line, and for successes ``notice`` (True: exactly one ``note:`` line is expected, holding the
needles; False: ``-q`` is passed and stderr must be empty).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class Ctx:
    model: Path
    target: Path
    scratch: Path

    @property
    def index(self) -> Path:
        return self.model / "model.safetensors.index.json"

    def weight_map(self) -> dict[str, str]:
        return json.loads(self.index.read_text())["weight_map"]

    def shard_of(self, tensor: str) -> Path:
        return self.model / self.weight_map()[tensor]

    def q(self, *extra: str | Path) -> list[str]:
        return ["quantize", str(self.model), "-o", str(self.target), *map(str, extra)]


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]
    code: int = 2
    needles: tuple[str, ...] = ()
    notice: bool = False
    load: bool = True  # successes: load the output with transformers
    copied: tuple[str, ...] = ()  # successes: files that must be in the output
    not_copied: tuple[str, ...] = ()  # successes: files that must not be in the output
    tensors: tuple[str, ...] = ()  # successes: tensors that must be in the output


FIRST = "model-00001-of-00003.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


# ---------------------------------------------------------------- raw header surgery


def split_file(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def write_raw(path: Path, header: bytes | str, data: bytes) -> None:
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def header_case(edit: Callable[[dict, bytes], tuple[object, bytes]], shard: str = FIRST) -> Callable[[Ctx], list[str]]:
    """Rewrite one shard's header: ``edit(header, data)`` returns the new header (dict or raw text) and data."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.model / shard
        header, data = split_file(path)
        new_header, new_data = edit(json.loads(header), data)
        write_raw(path, new_header if isinstance(new_header, (bytes, str)) else json.dumps(new_header), new_data)
        return ctx.q()

    return setup


def _first_tensor(h: dict) -> str:
    return min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _last_tensor(h: dict) -> str:
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])


def _set_first(key: str, value: object) -> Callable[[dict, bytes], tuple[object, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[object, bytes]:
        h[_first_tensor(h)][key] = value
        return h, d
    return edit


def _shift_all(by: int) -> Callable[[dict, bytes], tuple[object, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[object, bytes]:
        for k, v in h.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0] + by, v["data_offsets"][1] + by]
        return h, b"\0" * by + d
    return edit


def _gap(h: dict, d: bytes) -> tuple[object, bytes]:
    last = _last_tensor(h)
    begin, end = h[last]["data_offsets"]
    h[last]["data_offsets"] = [begin + 8, end + 8]
    return h, d[:begin] + b"\0" * 8 + d[begin:]


def _overlap(h: dict, d: bytes) -> tuple[object, bytes]:
    last = _last_tensor(h)
    begin, end = h[last]["data_offsets"]
    h[last]["data_offsets"] = [begin - 2, end - 2]
    return h, d[:-2]


def _swap_offsets(h: dict, d: bytes) -> tuple[object, bytes]:
    first = _first_tensor(h)
    h[first]["data_offsets"] = list(reversed(h[first]["data_offsets"]))
    return h, d


def _duplicate_name(h: dict, d: bytes) -> tuple[object, bytes]:
    first = _first_tensor(h)
    body = json.dumps(h)
    entry = json.dumps(h[first])
    # The same name twice, the second entry identical: the reference reader keeps the last silently.
    return body[:-1] + f", {json.dumps(first)}: {entry}" + "}", d


def _metadata(value: object) -> Callable[[dict, bytes], tuple[object, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[object, bytes]:
        h["__metadata__"] = value
        return h, d
    return edit


def _raw_text(transform: Callable[[str], str]) -> Callable[[dict, bytes], tuple[object, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[object, bytes]:
        return transform(json.dumps(h)), d
    return edit


def _raw_shape(text: str) -> Callable[[dict, bytes], tuple[object, bytes]]:
    """Replace the first tensor's shape by raw JSON text (values json.dumps cannot write)."""
    def edit(h: dict, d: bytes) -> tuple[object, bytes]:
        first = _first_tensor(h)
        h[first]["shape"] = "@@SHAPE@@"
        return json.dumps(h).replace('"@@SHAPE@@"', text), d
    return edit


def _zero_dim_huge(h: dict, d: bytes) -> tuple[object, bytes]:
    # A zero-size tensor whose other dimension does not fit in 64 bits (written back unreadable before).
    h["model.extra.huge"] = {"dtype": "BF16", "shape": "@@", "data_offsets": [0, 0]}
    return json.dumps(h).replace('"@@"', f"[{2**64 + 1}, 0]"), d


def _truncate_data(h: dict, d: bytes) -> tuple[object, bytes]:
    return h, d[:-100]


def _trailing(h: dict, d: bytes) -> tuple[object, bytes]:
    return h, d + b"\0" * 16


def _deep_extra(depth: int) -> Callable[[dict, bytes], tuple[object, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[object, bytes]:
        first = _first_tensor(h)
        h[first]["x"] = "@@DEEP@@"
        return json.dumps(h).replace('"@@DEEP@@"', "[" * depth + "]" * depth), d
    return edit


def _dtype_size_mismatch(h: dict, d: bytes) -> tuple[object, bytes]:
    h[_first_tensor(h)]["dtype"] = "F32"  # bf16 bytes described as f32: shape needs twice the span
    return h, d


def _header_length(value: Callable[[int, int], int]) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.model / FIRST
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(struct.pack("<Q", value(n, len(raw))) + raw[8:])
        return ctx.q()
    return setup


def _file_bytes(content: bytes) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        (ctx.model / FIRST).write_bytes(content)
        return ctx.q()
    return setup


HEADER_CASES = [
    Case("header: gap between tensors", header_case(_gap), needles=(FIRST, "gaps")),
    Case("header: offsets start at 8", header_case(_shift_all(8)), needles=(FIRST,)),
    Case("header: overlapping tensors", header_case(_overlap), needles=(FIRST,)),
    Case("header: reversed offsets", header_case(_swap_offsets), needles=(FIRST,)),
    Case("header: trailing bytes", header_case(_trailing), needles=(FIRST, "after the last tensor")),
    Case("header: truncated data", header_case(_truncate_data), needles=(FIRST, "truncated")),
    Case("header: duplicate tensor name", header_case(_duplicate_name), needles=(FIRST, "named twice")),
    Case("header: __metadata__ a string", header_case(_metadata("pt")), needles=(FIRST, "__metadata__")),
    Case("header: __metadata__ a list", header_case(_metadata(["pt"])), needles=(FIRST, "__metadata__")),
    Case("header: __metadata__ value an int", header_case(_metadata({"format": 1})), needles=(FIRST, "__metadata__")),
    Case("header: __metadata__ value null", header_case(_metadata({"format": None})), needles=(FIRST,)),
    Case("header: __metadata__ twice", header_case(_raw_text(lambda t: t[:-1] + ', "__metadata__": {}}')),
         needles=(FIRST, "__metadata__")),
    Case("header: __metadata__ null is fine", header_case(_metadata(None)), code=0),
    Case("header: extra field is fine", header_case(_set_first("x", 1)), code=0),
    Case("header: nesting 100 deep in an extra field is fine", header_case(_deep_extra(100)), code=0),
    Case("header: nesting 200 deep", header_case(_deep_extra(200)), needles=(FIRST, "deep")),
    Case("header: nesting 100000 deep", header_case(_deep_extra(100_000)), needles=(FIRST,)),
    Case("header: zero dim beside a dim over 2**64", header_case(_zero_dim_huge), needles=(FIRST,)),
    Case("header: dim 2**64", header_case(_raw_shape(f"[{2**64}, 1]")), needles=(FIRST,)),
    Case("header: negative dim", header_case(_raw_shape("[-1, 128]")), needles=(FIRST,)),
    Case("header: minus zero dim", header_case(_raw_shape("[-0, 128]")), needles=(FIRST,)),
    Case("header: float dim", header_case(_raw_shape("[128.0, 128]")), needles=(FIRST,)),
    Case("header: exponent dim", header_case(_raw_shape("[1.28e2, 128]")), needles=(FIRST,)),
    Case("header: bool dim", header_case(_raw_shape("[true, 128]")), needles=(FIRST,)),
    Case("header: string dim", header_case(_raw_shape('["128", 128]')), needles=(FIRST,)),
    Case("header: shape null", header_case(_raw_shape("null")), needles=(FIRST,)),
    Case("header: shape product overflows", header_case(_raw_shape(f"[{2**40}, {2**40}, 0]")), needles=(FIRST,)),
    Case("header: dtype size mismatch", header_case(_dtype_size_mismatch), needles=(FIRST, "spans")),
    Case("header: unknown dtype", header_case(_set_first("dtype", "Q9")), needles=(FIRST, "dtype")),
    Case("header: lowercase dtype", header_case(_set_first("dtype", "bf16")), needles=(FIRST, "dtype")),
    Case("header: dtype not a string", header_case(_set_first("dtype", 16)), needles=(FIRST, "dtype")),
    Case("header: three offsets", header_case(_set_first("data_offsets", [0, 1, 2])), needles=(FIRST,)),
    Case("header: offsets a dict", header_case(_set_first("data_offsets", {"a": 0})), needles=(FIRST,)),
    Case("header: entry a list", header_case(lambda h, d: ({**h, _first_tensor(h): [1]}, d)), needles=(FIRST,)),
    Case("header: not an object", header_case(lambda h, d: ("[]", d)), needles=(FIRST, "not a JSON object")),
    Case("header: NaN literal", header_case(_raw_text(lambda t: t[:-1] + ', "__x": NaN}')), needles=(FIRST,)),
    Case("header: lone surrogate in a name", header_case(_raw_text(lambda t: t[:-1] + ', "\\ud800": {}}')),
         needles=(FIRST,)),
    Case("header: UTF-8 BOM", header_case(_raw_text(lambda t: "\ufeff" + t)), needles=(FIRST,)),
    Case("header: invalid UTF-8", header_case(lambda h, d: (b'{"\xff": 1}', d)), needles=(FIRST, "UTF-8")),
    Case("header: NUL after the JSON", header_case(_raw_text(lambda t: t + "\0")), needles=(FIRST,)),
    Case("header: whitespace around the JSON is fine", header_case(_raw_text(lambda t: " \t" + t + "\n ")), code=0),
    Case("header: length past the end", _header_length(lambda n, size: size), needles=(FIRST,)),
    Case("header: length over 100 MB", _header_length(lambda n, size: 100_000_001), needles=(FIRST,)),
    Case("header: length 2**64-1", _header_length(lambda n, size: 2**64 - 1), needles=(FIRST,)),
    Case("header: length 0", _header_length(lambda n, size: 0), needles=(FIRST,)),
    Case("header: empty file", _file_bytes(b""), needles=(FIRST, "too short")),
    Case("header: 7-byte file", _file_bytes(b"\x02\0\0\0\0\0\0"), needles=(FIRST, "too short")),
    Case("header: dtype F4 (reference knows it, torch cannot hold it)",
         header_case(lambda h, d: ({**h, "model.extra.f4": {"dtype": "F4", "shape": [0], "data_offsets": [0, 0]}},
                                   d)), needles=(FIRST, "F4")),
]


# ---------------------------------------------------------------- index


def _edit_index(edit: Callable[[dict, Ctx], object]) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        index = json.loads(ctx.index.read_text())
        new = edit(index, ctx)
        ctx.index.write_text(new if isinstance(new, str) else json.dumps(index if new is None else new))
        return ctx.q()
    return setup


def _drop_from_index(name: str) -> Callable[[dict, Ctx], object]:
    def edit(index: dict, ctx: Ctx) -> None:
        del index["weight_map"][name]
    return edit


def _also_in_other_shard(ctx: Ctx) -> list[str]:
    """Copy one tensor into a second shard, so two shards hold it."""
    name = "model.norm.weight"
    source = ctx.shard_of(name)
    other = next(p for p in sorted(ctx.model.glob("model-*.safetensors")) if p != source)
    with safe_open(source, "pt") as f:
        extra = f.get_tensor(name)
    with safe_open(other, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = extra
    save_file(tensors, other, metadata={"format": "pt"})
    return ctx.q()


def _special_at(relative: str, kind: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.model / relative
        if path.exists():
            path.unlink()
        make_special(path, kind)
        return ctx.q()
    return setup


def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "null":
        path.symlink_to("/dev/null")
    elif kind == "socket":
        here = os.getcwd()
        os.chdir(path.parent)  # AF_UNIX paths are limited to ~108 bytes: bind a short relative name
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path.name)
            sock.close()
        finally:
            os.chdir(here)
    elif kind == "dangling":
        path.symlink_to(path.parent / "does-not-exist")
    else:
        raise ValueError(kind)


INDEX_CASES = [
    Case("index: names a missing shard", _edit_index(
        lambda i, c: i["weight_map"].__setitem__(DOWN, "model-00099-of-00099.safetensors")),
        needles=("model-00099-of-00099.safetensors", "does not exist")),
    Case("index: names a missing tensor", _edit_index(
        lambda i, c: i["weight_map"].__setitem__("model.phantom.weight", FIRST)),
        needles=("model.phantom.weight", "not in its shard")),
    Case("index: omits a tensor its shard holds (carried, with a notice)", _edit_index(_drop_from_index(DOWN)),
         code=0, notice=True, needles=("not in its index",), tensors=("model.layers.0.mlp.down_proj.weight_packed",)),
    Case("index: omits a plain tensor (carried)", _edit_index(_drop_from_index("model.norm.weight")),
         code=0, notice=True, needles=("model.norm.weight",), tensors=("model.norm.weight",)),
    Case("index: a tensor in two shards", _also_in_other_shard, needles=("model.norm.weight",)),
    Case("index: not JSON", _edit_index(lambda i, c: "{not json"), needles=("index.json", "not valid JSON")),
    Case("index: weight_map a list", _edit_index(lambda i, c: {"weight_map": []}), needles=("weight_map",)),
    Case("index: weight_map empty", _edit_index(lambda i, c: {"weight_map": {}}), needles=("weight_map",)),
    Case("index: a list", _edit_index(lambda i, c: "[]"), needles=("weight_map",)),
    Case("index: shard name with a path", _edit_index(
        lambda i, c: i["weight_map"].__setitem__(DOWN, "../" + i["weight_map"][DOWN])), needles=("invalid shard",)),
    Case("index: shard name not a string", _edit_index(
        lambda i, c: i["weight_map"].__setitem__(DOWN, 3)), needles=("invalid shard",)),
    Case("index: nested 100000 deep", _edit_index(lambda i, c: "[" * 100_000 + "]" * 100_000),
         needles=("index.json",)),
    Case("index: not UTF-8", lambda c: (c.index.write_bytes(b'{"weight_map": "\xff"}'), c.q())[1],
         needles=("index.json",)),
    Case("index: a folder", _special_at("model.safetensors.index.json", "folder"), needles=("index.json", "folder")),
    Case("index: a FIFO", _special_at("model.safetensors.index.json", "fifo"), needles=("index.json", "FIFO")),
    Case("index: a link to /dev/zero", _special_at("model.safetensors.index.json", "device"),
         needles=("index.json", "device")),
    Case("shard: a FIFO", _special_at(FIRST, "fifo"), needles=(FIRST, "FIFO")),
    Case("shard: a folder", _special_at(FIRST, "folder"), needles=(FIRST, "folder")),
    Case("shard: a link to /dev/zero", _special_at(FIRST, "device"), needles=(FIRST, "device")),
    Case("shard: a link to /dev/null", _special_at(FIRST, "null"), needles=(FIRST, "device")),
    Case("shard: a socket", _special_at(FIRST, "socket"), needles=(FIRST, "socket")),
    Case("shard: a dangling link", _special_at(FIRST, "dangling"), needles=(FIRST,)),
]


def _unindexed_fifo(ctx: Ctx) -> list[str]:
    """No index: a FIFO named model.safetensors among the weights must not hang the run."""
    for path in ctx.model.glob("*.safetensors*"):
        path.unlink()
    make_special(ctx.model / "model.safetensors", "fifo")
    return ctx.q()


def _inspect_fifo(ctx: Ctx) -> list[str]:
    for path in ctx.model.glob("*.safetensors*"):
        path.unlink()
    make_special(ctx.model / "model.safetensors", "fifo")
    return ["inspect", str(ctx.model)]


def _inspect_fifo_file(ctx: Ctx) -> list[str]:
    make_special(ctx.scratch / "x.safetensors", "fifo")
    return ["inspect", str(ctx.scratch / "x.safetensors")]


INDEX_CASES += [
    Case("single file: model.safetensors a FIFO", _unindexed_fifo, needles=("model.safetensors", "FIFO")),
    Case("inspect: model.safetensors a FIFO", _inspect_fifo, needles=("model.safetensors", "FIFO")),
    Case("inspect: a FIFO given as the file", _inspect_fifo_file, needles=("x.safetensors", "FIFO")),
]


# ---------------------------------------------------------------- config


def _config(text: str | bytes | Callable[[dict], object]) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.model / "config.json"
        if callable(text):
            config = json.loads(path.read_text())
            new = text(config)
            path.write_text(json.dumps(config if new is None else new))
        elif isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return ctx.q()
    return setup


def _set(key: str, value: object) -> Callable[[dict], object]:
    return lambda config: config.__setitem__(key, value)


def _qconfig(value: object) -> Callable[[dict], object]:
    return _set("quantization_config", value)


CONFIG_CASES = [
    Case("config: quantization_config a string", _config(_qconfig("fp8")), needles=("config.json",
                                                                                     "quantization_config")),
    Case("config: quantization_config a list", _config(_qconfig([{"quant_method": "fp8"}])),
         needles=("quantization_config",)),
    Case("config: config_groups a list of groups", _config(_qconfig({"config_groups": [{"targets": ["Linear"]}]})),
         needles=("config_groups",)),
    Case("config: a group a string", _config(_qconfig({"config_groups": {"g": "Linear"}})),
         needles=("config_groups.g",)),
    Case("config: targets a string", _config(_qconfig({"config_groups": {"g": {"targets": "Linear"}}})),
         needles=("targets",)),
    Case("config: targets a bad regex", _config(_qconfig({"config_groups": {"g": {"targets": ["re:("]}}})),
         needles=("targets", "regular expression")),
    Case("config: weights a list", _config(_qconfig({"config_groups": {"g": {"targets": ["Linear"],
                                                                          "weights": [8]}}})),
         needles=("weights",)),
    Case("config: weight_block_size a string", _config(_qconfig({"weight_block_size": "128x128"})),
         needles=("weight_block_size",)),
    Case("config: weight_block_size zero", _config(_qconfig({"weight_block_size": [0, 128]})),
         needles=("weight_block_size",)),
    Case("config: torch_dtype a module name", _config(_set("torch_dtype", "nn")), needles=("torch_dtype",)),
    Case("config: torch_dtype an int", _config(_set("torch_dtype", 16)), needles=("torch_dtype",)),
    Case("config: torch_dtype int8", _config(_set("torch_dtype", "int8")), needles=("torch_dtype",)),
    Case("config: torch_dtype a list", _config(_set("torch_dtype", ["bfloat16"])), needles=("torch_dtype",)),
    Case("config: torch_dtype auto is fine", _config(_set("torch_dtype", "auto")), code=0),
    Case("config: architectures a string", _config(_set("architectures", "LlamaForCausalLM")),
         needles=("architectures",)),
    Case("config: a list", _config("[]"), needles=("config.json", "JSON object")),
    Case("config: a string", _config('"llama"'), needles=("config.json", "JSON object")),
    Case("config: not JSON", _config("{"), needles=("config.json", "not valid JSON")),
    Case("config: empty", _config(""), needles=("config.json", "not valid JSON")),
    Case("config: nested 100000 deep", _config("[" * 100_000 + "]" * 100_000), needles=("config.json", "deep")),
    Case("config: nested 100 deep in a field", _config('{"x": ' + "[" * 100 + "]" * 100 + "}"),
         needles=("config.json", "deep")),
    Case("config: not UTF-8", _config(b'{"model_type": "\xff"}'), needles=("config.json", "UTF-8")),
    Case("config: a folder", _special_at("config.json", "folder"), needles=("config.json", "folder")),
    Case("config: a FIFO", _special_at("config.json", "fifo"), needles=("config.json", "FIFO")),
    Case("config: a link to /dev/zero", _special_at("config.json", "device"), needles=("config.json", "/dev/zero")),
    Case("config: a dangling link", _special_at("config.json", "dangling"), needles=("config.json",)),
    Case("config: a link to a JSON file outside the model folder", lambda c: (
        (c.model / "config.json").rename(c.scratch / "secret.json"),
        (c.model / "config.json").symlink_to(c.scratch / "secret.json"), c.q())[2],
        needles=("config.json", "outside")),
]


# ---------------------------------------------------------------- links and special files among the extras


def _link(name: str, to: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.model / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(to(ctx))
        return ctx.q()
    return setup


def _secret(ctx: Ctx) -> Path:
    secret = ctx.scratch / "home" / ".token"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("hf_SECRET_TOKEN\n")
    return secret


def _outside_folder(ctx: Ctx) -> Path:
    folder = ctx.scratch / "elsewhere"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("outside\n")
    return folder


def _extra_special(name: str, kind: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        make_special(ctx.model / name, kind)
        return ctx.q()
    return setup


def _hub_snapshot(escape: bool) -> Callable[[Ctx], list[str]]:
    """The model laid out as the hub cache does: snapshots/<rev>/* are links into ../../blobs."""
    def setup(ctx: Ctx) -> list[str]:
        repo = ctx.scratch / "hub" / "models--org--tiny"
        blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
        blobs.mkdir(parents=True)
        snapshot.mkdir(parents=True)
        for path in sorted(ctx.model.rglob("*")):
            if path.is_file():
                blob = blobs / f"blob{len(list(blobs.iterdir()))}"
                blob.write_bytes(path.read_bytes())
                link = snapshot / path.relative_to(ctx.model)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, link.parent))
        if escape:
            (snapshot / "tokenizer.json").symlink_to(_secret(ctx))
        ctx.model = snapshot  # the input is now the snapshot
        return ctx.q()
    return setup


LINK_CASES = [
    Case("link: tokenizer.json to /etc/passwd", _link("tokenizer.json", lambda c: Path("/etc/passwd")), code=0,
         notice=True, needles=("tokenizer.json", "outside"), not_copied=("tokenizer.json",)),
    Case("link: a token in the home folder", _link("token.txt", _secret), code=0, notice=True,
         needles=("token.txt", "outside"), not_copied=("token.txt",)),
    Case("link: relative ../ link out", _link("up.txt", lambda c: (_secret(c), Path("../home/.token"))[1]), code=0,
         notice=True, needles=("up.txt",), not_copied=("up.txt",)),
    Case("link: in a sub-folder, to /etc/hostname", _link("extra/host", lambda c: Path("/etc/hostname")), code=0,
         notice=True, needles=("extra/host",), not_copied=("extra/host",)),
    Case("link: a folder outside", _link("outdir", _outside_folder), code=0, notice=True, needles=("outdir",),
         not_copied=("outdir", "outdir/a.txt")),
    Case("link: a folder inside (not followed)", _link("alias", lambda c: c.model / "extra"), code=0, notice=True,
         needles=("alias", "folder"), not_copied=("alias",)),
    Case("link: a file inside is copied", _link("gen.json", lambda c: Path("generation_config.json")), code=0,
         copied=("gen.json",)),
    Case("link: dangling", _link("gone.txt", lambda c: c.scratch / "nothing"), code=0, notice=True,
         needles=("gone.txt",), not_copied=("gone.txt",)),
    Case("extra: a FIFO", _extra_special("pipe.txt", "fifo"), code=0, notice=True, needles=("pipe.txt", "FIFO"),
         not_copied=("pipe.txt",)),
    Case("extra: a socket", _extra_special("sock", "socket"), code=0, notice=True, needles=("sock",),
         not_copied=("sock",)),
    Case("extra: a link to /dev/zero", _extra_special("zero.bin", "device"), code=0, notice=True,
         needles=("zero.bin",), not_copied=("zero.bin",)),
    Case("hub cache: snapshot links into blobs are copied", _hub_snapshot(False), code=0,
         copied=("generation_config.json", "extra/notes.txt")),
    Case("hub cache: a snapshot link leaving the repo", _hub_snapshot(True), code=0, notice=True,
         needles=("tokenizer.json", "outside"), not_copied=("tokenizer.json",), copied=("generation_config.json",)),
]


# ---------------------------------------------------------------- where the output goes


def _out(where: Callable[[Ctx], Path], *extra: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        ctx.target = where(ctx)
        return ctx.q(*extra)
    return setup


def _alias_link(ctx: Ctx, to: Path) -> Path:
    link = ctx.scratch / "alias"
    link.symlink_to(to)
    return link


def _old_output_holding_link_to_input(ctx: Ctx) -> Path:
    ctx.target.mkdir()
    (ctx.target / "old.txt").write_text("old\n")
    (ctx.target / "input-link").symlink_to(ctx.model)
    return ctx.target


def _old_output_holding_hardlink(ctx: Ctx) -> Path:
    ctx.target.mkdir()
    os.link(ctx.model / "config.json", ctx.target / "config.json")
    return ctx.target


def _existing_file(ctx: Ctx) -> Path:
    ctx.target.write_text("not a folder\n")
    return ctx.target


def _non_empty(ctx: Ctx) -> Path:
    ctx.target.mkdir()
    (ctx.target / "keep.txt").write_text("precious\n")
    return ctx.target


def _under_file(ctx: Ctx) -> Path:
    blocker = ctx.target.parent / "file"
    blocker.write_text("x")
    return blocker / "out"


OUTPUT_CASES = [
    Case("output: the input", _out(lambda c: c.model), needles=("input",)),
    Case("output: the input with --overwrite", _out(lambda c: c.model, "--overwrite"), needles=("input",)),
    Case("output: inside the input", _out(lambda c: c.model / "q"), needles=("input",)),
    Case("output: the input's parent with --overwrite", _out(lambda c: c.model.parent, "--overwrite"),
         needles=("input",)),
    Case("output: the input through a link", _out(lambda c: _alias_link(c, c.model), "--overwrite"),
         needles=("input",)),
    Case("output: inside the input through a link", _out(lambda c: _alias_link(c, c.model) / "q"),
         needles=("input",)),
    Case("output: the input's parent through a link", _out(lambda c: _alias_link(c, c.model.parent), "--overwrite"),
         needles=("input",)),
    Case("output: the input spelled with ./ and ..", _out(lambda c: c.model / "extra" / ".." / "."),
         needles=("input",)),
    Case("output: an existing file", _out(_existing_file), needles=("not a folder",)),
    Case("output: non-empty without --overwrite", _out(_non_empty), needles=("--overwrite",)),
    Case("output: under a file", _out(_under_file), needles=("out",)),
    Case("output: name 300 characters long", _out(lambda c: c.target.parent / ("x" * 300)), needles=("longer",)),
    Case("output: name 245 characters long works", _out(lambda c: c.target.parent / ("y" * 245)), code=0),
    Case("output: --overwrite of an old output linking to the input", _out(_old_output_holding_link_to_input,
                                                                           "--overwrite"), code=0),
    Case("output: --overwrite of an old output hard-linking an input file", _out(_old_output_holding_hardlink,
                                                                                 "--overwrite"), code=0),
]


# ---------------------------------------------------------------- options


def _opts(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.q(*extra)


def _overrides_file(content: bytes | None, kind: str | None = None) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.scratch / "overrides.txt"
        if kind:
            make_special(path, kind)
        elif content is not None:
            path.write_bytes(content)
        return ctx.q("--overrides", path)
    return setup


def _verify(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["verify", str(ctx.model), *extra]


def _convert(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["convert", str(ctx.model), "-o", str(ctx.target), *extra]


OPTION_CASES = [
    Case(f"option: --max-shard-size {size}", _opts("--max-shard-size", size), needles=("--max-shard-size",))
    for size in ("1e400", "nan", "inf", "-inf", "-1", "0", "0.0", "", "5XB", "lots", "1e30TB", "NaNGB")
] + [
    Case("option: --max-shard-size 1B (one tensor per shard) works", _opts("--max-shard-size", "1B"), code=0),
    Case("option: --group-size 0", _opts("--group-size", "0"), needles=("--group-size",)),
    Case("option: --group-size -2", _opts("--group-size", "-2"), needles=("--group-size",)),
    Case("option: --group-size 3 (no layer fits)", _opts("--group-size", "3"), needles=("no tensor to quantize",)),
    Case("option: --scheme rtn3", _opts("--scheme", "rtn3"), needles=("rtn3",)),
    Case("option: --layout bogus", _opts("--layout", "bogus"), needles=("--layout",)),
    Case("option: --fuse unclosed", _opts("--scheme", "fp8-tensor", "--fuse", "("), needles=("--fuse",)),
    Case("option: --fuse without a group", _opts("--scheme", "fp8-tensor", "--fuse", "x"), needles=("--fuse",)),
    Case("option: --ignore bad regex", _opts("--ignore", "re:("), needles=("--ignore",)),
    Case("option: --targets bad regex", _opts("--targets", "re:["), needles=("--targets",)),
    Case("option: --override without =", _opts("--override", "lm_head"), needles=("--override",)),
    Case("option: --override empty pattern", _opts("--override", "=rtn4"), needles=("--override",)),
    Case("option: --override unknown scheme", _opts("--override", "x=bogus"), needles=("bogus",)),
    Case("option: --overrides missing file", _overrides_file(None), needles=("overrides.txt",)),
    Case("option: --overrides not UTF-8", _overrides_file(b"re:.*=rtn8 \xff\xfe\n"), needles=("overrides.txt",
                                                                                              "UTF-8")),
    Case("option: --overrides a FIFO", _overrides_file(None, "fifo"), needles=("overrides.txt", "FIFO")),
    Case("option: --overrides a folder", _overrides_file(None, "folder"), needles=("overrides.txt",)),
    Case("option: --overrides a bad line", _overrides_file(b"nonsense\n"), needles=("nonsense",)),
    Case("option: --overrides UTF-8 works", _overrides_file("# é comment\nre:.*down_proj=none\n".encode()),
         code=0),
    Case("option: unknown option", _opts("--no-such-option"), needles=("No such option",)),
    Case("verify: --tokens 0", _verify("--tokens", "0"), needles=("--tokens",)),
    Case("verify: --device tpu", _verify("--device", "tpu"), needles=("--device",)),
    Case("verify: unquantized input", _verify("--device", "cpu"), needles=("no quantized layers",)),
    Case("convert: --op bogus", _convert("--op", "bogus"), needles=("bogus",)),
    Case("convert: --dtype bogus", _convert("--op", "dequantize", "--dtype", "int3"), needles=("--dtype",)),
    Case("convert: --max-shard-size nan", _convert("--op", "dequantize", "--max-shard-size", "nan"),
         needles=("--max-shard-size",)),
]


# ---------------------------------------------------------------- numerics and names


def _rewrite_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor | None],
                    rename: str | None = None, add: dict[str, torch.Tensor] | None = None,
                    index_too: bool = True) -> Callable[[Ctx], list[str]]:
    """Rewrite the shard holding ``name`` with the tensor changed (or renamed, or with tensors added)."""
    def setup(ctx: Ctx) -> list[str]:
        shard = ctx.shard_of(name)
        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        changed = change(tensors[name])
        if changed is not None:
            tensors[name] = changed
        if rename is not None:
            tensors[rename] = tensors.pop(name)
        tensors.update(add or {})
        save_file(tensors, shard, metadata={"format": "pt"})
        if index_too:
            index = json.loads(ctx.index.read_text())
            if rename is not None:
                index["weight_map"][rename] = index["weight_map"].pop(name)
            for extra in add or {}:
                index["weight_map"][extra] = shard.name
            ctx.index.write_text(json.dumps(index))
        return ctx.q()
    return setup


def _poke(value: float, at: tuple[int, int] = (3, 7)) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[at] = value
        return t
    return change


def _scaled_to(value: float, dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight rescaled so its largest magnitude is ``value`` (a negative one: int codes reach -2**(b-1))."""
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        t = t / t.abs().max() * abs(value)
        t[0, 0] = value
        return t.to(dtype or torch.bfloat16)
    return change


def _with_scheme(setup: Callable[[Ctx], list[str]], *extra: str) -> Callable[[Ctx], list[str]]:
    def wrapped(ctx: Ctx) -> list[str]:
        return setup(ctx) + list(extra)
    return wrapped


BF16_MAX = torch.finfo(torch.bfloat16).max
F16_MAX = torch.finfo(torch.float16).max
ESC_NAME = "model.layers.0.mlp.bad\n\x1b[31mname.weight"


def _all_fp16(ctx: Ctx) -> None:
    for shard in ctx.model.glob("model-*.safetensors"):
        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k).to(torch.float16) for k in f.keys()}
        save_file(tensors, shard, metadata={"format": "pt"})


def _fp16_near_max(scheme: str, fraction: float) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        _all_fp16(ctx)
        return [*_rewrite_tensor(DOWN, _scaled_to(-fraction * F16_MAX, torch.float16))(ctx), "--scheme", scheme]
    return setup


NUMERIC_CASES = [
    Case("numerics: NaN in q_proj under fp8-tensor blames q_proj",
         _with_scheme(_rewrite_tensor(Q_PROJ, _poke(float("nan"))), "--scheme", "fp8-tensor"),
         needles=(Q_PROJ, "1 NaN")),
    Case("numerics: Inf in k_proj under fp8-tensor blames k_proj",
         _with_scheme(_rewrite_tensor(K_PROJ, _poke(float("inf"))), "--scheme", "fp8-tensor"),
         needles=(K_PROJ, "1 Inf")),
] + [
    Case(f"numerics: NaN in down_proj under {scheme}",
         _with_scheme(_rewrite_tensor(DOWN, _poke(float("nan"))), "--scheme", scheme), needles=(DOWN, "1 NaN"))
    for scheme in ("rtn4", "rtn8", "w8a8-int8", "fp8", "fp8-block", "int8-block")
] + [
    Case(f"numerics: bf16 weights at -max under {scheme} would dequantize to Inf",
         _with_scheme(_rewrite_tensor(DOWN, _scaled_to(-BF16_MAX)), "--scheme", scheme), needles=(DOWN, "Inf"))
    for scheme in ("rtn4", "rtn8", "w8a8-int8", "int8-block", "fp8-block", "fp8", "fp8-tensor")
] + [
    Case("numerics: bf16 weights at -0.99 x max under rtn4 would dequantize to Inf",
         _rewrite_tensor(DOWN, _scaled_to(-0.99 * BF16_MAX)), needles=(DOWN, "Inf")),
    Case("numerics: bf16 weights at -0.99 x max under fp8 stay finite",
         _with_scheme(_rewrite_tensor(DOWN, _scaled_to(-0.99 * BF16_MAX)), "--scheme", "fp8"), code=0),
    Case("numerics: bf16 weights at -0.99 x max under w8a8-int8 stay finite",
         _with_scheme(_rewrite_tensor(DOWN, _scaled_to(-0.99 * BF16_MAX)), "--scheme", "w8a8-int8"), code=0),
    Case("numerics: fp16 weights at -0.99 x max under rtn4", _fp16_near_max("rtn4", 0.99), needles=(DOWN, "Inf")),
    Case("numerics: fp16 weights at -max under w8a8-int8", _fp16_near_max("w8a8-int8", 1.0), needles=(DOWN, "Inf")),
    Case("numerics: fp16 weights at -max under fp8-block", _fp16_near_max("fp8-block", 1.0), needles=(DOWN, "Inf")),
    Case("numerics: fp16 weights at -0.99 x max under fp8-block stay finite", _fp16_near_max("fp8-block", 0.99),
         code=0),
    Case("numerics: NaN in q_proj under nvfp4 blames q_proj (the shared global scale's pre-pass)",
         _with_scheme(_rewrite_tensor(Q_PROJ, _poke(float("nan"))), "--scheme", "nvfp4"), needles=(Q_PROJ, "1 NaN")),
    Case("numerics: Inf in k_proj under nvfp4 blames k_proj",
         _with_scheme(_rewrite_tensor(K_PROJ, _poke(float("inf"))), "--scheme", "nvfp4"), needles=(K_PROJ, "1 Inf")),
    *(Case(f"numerics: NaN in down_proj under {scheme}",
           _with_scheme(_rewrite_tensor(DOWN, _poke(float("nan"))), "--scheme", scheme), needles=(DOWN, "1 NaN"))
      for scheme in ("nvfp4", "mxfp4", "mxfp8")),
    # MX scales are powers of two: a group whose amax is near the dtype's maximum rounds its scale up, and
    # 6 (or 448) times it passes the maximum. NVFP4's block scale is at most amax / 6: its codes stay finite.
    *(Case(f"numerics: bf16 weights at -max under {scheme} would dequantize to Inf",
           _with_scheme(_rewrite_tensor(DOWN, _scaled_to(-BF16_MAX)), "--scheme", scheme), needles=(DOWN, "Inf"))
      for scheme in ("mxfp4", "mxfp8")),
    Case("numerics: bf16 weights at -0.99 x max under nvfp4 stay finite",
         _with_scheme(_rewrite_tensor(DOWN, _scaled_to(-0.99 * BF16_MAX)), "--scheme", "nvfp4"), code=0),
    Case("numerics: large but safe weights (1e30) work", _rewrite_tensor(DOWN, _scaled_to(-1e30)), code=0),
    Case("numerics: an all-zero weight works", _rewrite_tensor(DOWN, lambda t: torch.zeros_like(t)), code=0),
    Case("numerics: a [256, 0] weight", _rewrite_tensor(DOWN, lambda t: None, add={
        "model.layers.0.mlp.empty_proj.weight": torch.zeros(256, 0, dtype=torch.bfloat16)}),
        needles=("empty_proj", "[256, 0]")),
    Case("numerics: an fp8 weight without a scale", _rewrite_tensor(DOWN, lambda t: t.to(torch.float8_e4m3fn)),
         needles=(DOWN, "no weight_scale")),
    Case("names: stray weight_scale beside a bf16 weight", _rewrite_tensor(DOWN, lambda t: None, add={
        "model.layers.0.mlp.down_proj.weight_scale": torch.ones(128, 2, dtype=torch.bfloat16)}),
        needles=("down_proj.weight_scale", "twice")),
    Case("names: stray weight_shape beside a bf16 weight", _rewrite_tensor(DOWN, lambda t: None, add={
        "model.layers.0.mlp.down_proj.weight_shape": torch.tensor([128, 256])}),
        needles=("down_proj.weight_shape", "twice")),
    Case("names: stray weight_scale_inv beside a bf16 weight (sglang layout)",
         _with_scheme(_rewrite_tensor(DOWN, lambda t: None, add={
             "model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(1, 2)}), "--scheme", "int8-block",
             "--layout", "sglang", "--force-layout"),
         needles=("down_proj.weight_scale_inv", "twice")),
    Case("names: stray weight_packed beside a bf16 weight", _rewrite_tensor(DOWN, lambda t: None, add={
        "model.layers.0.mlp.down_proj.weight_packed": torch.zeros(128, 32, dtype=torch.int32)}),
        needles=("down_proj",)),
    Case("names: newline and ANSI escape in a NaN tensor's name",
         _rewrite_tensor(DOWN, _poke(float("nan")), rename=ESC_NAME), needles=("\\x0a", "\\x1b[31m")),
    Case("names: markup and emoji codes in a NaN tensor's name are printed as they are",
         _rewrite_tensor(DOWN, _poke(float("nan")), rename="model.layers.0.mlp.x[red]:fire:.weight"),
         needles=("x[red]:fire:.weight",)),
    Case("names: newline and ANSI escape in a tensor that passes through work",
         _rewrite_tensor("model.norm.weight", lambda t: None, add={"odd\n\x1b[0mname": torch.ones(3)}), code=0,
         tensors=("odd\n\x1b[0mname",)),
    Case("names: a tensor named __metadata__-like", _rewrite_tensor("model.norm.weight", lambda t: None, add={
        "__meta__": torch.ones(2)}), code=0, tensors=("__meta__",)),
    Case("names: an empty tensor name", _rewrite_tensor("model.norm.weight", lambda t: None, add={
        "": torch.ones(2)}), code=0, load=False, tensors=("",)),
]

ALL_CASES = HEADER_CASES + INDEX_CASES + CONFIG_CASES + LINK_CASES + OUTPUT_CASES + OPTION_CASES + NUMERIC_CASES
