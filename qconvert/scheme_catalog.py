"""The scheme table as plain data, for the commands that must start without importing torch.

``qconvert schemes``, ``--help`` (the ``--scheme`` choices) and ``-s`` given an output variant read this
module; :mod:`qconvert.schemes` (whose formats need torch) is the truth, and
``tests/test_first_hour.py`` fails when the two differ. Regenerate with ``python -m qconvert.scheme_catalog``.
"""

from __future__ import annotations

# generated: python -m qconvert.scheme_catalog
CATALOG: tuple[dict, ...] = (
    {'name': 'rtn4',
     'label': 'int4 g128',
     'type': 'int',
     'number': 'int',
     'bits': 4,
     'strategy': 'group',
     'group_size': 128,
     'block': None,
     'format': 'pack-quantized',
     'input_activations': None,
     'summary': 'int4 symmetric round-to-nearest, one scale per 128 inputs, 8 values per int32'},
    {'name': 'rtn8',
     'label': 'int8 g128',
     'type': 'int',
     'number': 'int',
     'bits': 8,
     'strategy': 'group',
     'group_size': 128,
     'block': None,
     'format': 'pack-quantized',
     'input_activations': None,
     'summary': 'int8 symmetric round-to-nearest, one scale per 128 inputs, 4 values per int32'},
    {'name': 'int4-asym',
     'label': 'int4 asymmetric g128',
     'type': 'int',
     'number': 'int',
     'bits': 4,
     'strategy': 'group',
     'group_size': 128,
     'block': None,
     'format': 'pack-quantized',
     'input_activations': None,
     'summary': 'int4 asymmetric: a scale and an int zero point per 128 inputs, 8 values per int32'},
    {'name': 'int8-asym',
     'label': 'int8 asymmetric g128',
     'type': 'int',
     'number': 'int',
     'bits': 8,
     'strategy': 'group',
     'group_size': 128,
     'block': None,
     'format': 'pack-quantized',
     'input_activations': None,
     'summary': 'int8 asymmetric: a scale and an int zero point per 128 inputs, 4 values per int32'},
    {'name': 'int8-block',
     'label': 'int8 block 128x128',
     'type': 'int',
     'number': 'int',
     'bits': 8,
     'strategy': 'block',
     'group_size': None,
     'block': [128, 128],
     'format': 'int-quantized',
     'input_activations': {'num_bits': 8,
                           'type': 'int',
                           'symmetric': True,
                           'group_size': 128,
                           'strategy': 'group',
                           'dynamic': True},
     'summary': 'int8 weights, one scale per 128x128 block; int8 activations per token per 128 channels'},
    {'name': 'w8a8-int8',
     'label': 'int8 per-channel',
     'type': 'int',
     'number': 'int',
     'bits': 8,
     'strategy': 'channel',
     'group_size': None,
     'block': None,
     'format': 'int-quantized',
     'input_activations': {'num_bits': 8,
                           'type': 'int',
                           'symmetric': True,
                           'group_size': None,
                           'strategy': 'token',
                           'dynamic': True},
     'summary': 'int8 weights per output channel; int8 activations per token (dynamic)'},
    {'name': 'fp8',
     'label': 'fp8 per-channel',
     'type': 'float',
     'number': 'fp8_e4m3',
     'bits': 8,
     'strategy': 'channel',
     'group_size': None,
     'block': None,
     'format': 'float-quantized',
     'input_activations': {'num_bits': 8,
                           'type': 'float',
                           'symmetric': True,
                           'group_size': None,
                           'strategy': 'token',
                           'dynamic': True},
     'summary': 'fp8 e4m3fn weights per output channel; fp8 activations per token (dynamic)'},
    {'name': 'fp8-block',
     'label': 'fp8 block 128x128',
     'type': 'float',
     'number': 'fp8_e4m3',
     'bits': 8,
     'strategy': 'block',
     'group_size': None,
     'block': [128, 128],
     'format': 'float-quantized',
     'input_activations': {'num_bits': 8,
                           'type': 'float',
                           'symmetric': True,
                           'group_size': 128,
                           'strategy': 'group',
                           'dynamic': True},
     'summary': 'fp8 e4m3fn weights, one scale per 128x128 block; fp8 activations per token per 128 channels'},
    {'name': 'fp8-tensor',
     'label': 'fp8 per-tensor',
     'type': 'float',
     'number': 'fp8_e4m3',
     'bits': 8,
     'strategy': 'tensor',
     'group_size': None,
     'block': None,
     'format': 'float-quantized',
     'input_activations': {'num_bits': 8,
                           'type': 'float',
                           'symmetric': True,
                           'group_size': None,
                           'strategy': 'token',
                           'dynamic': True},
     'summary': 'fp8 e4m3fn weights, one scale per tensor, shared by q/k/v and by gate/up; fp8 activations per '
                'token'},
    {'name': 'nvfp4',
     'label': 'fp4 g16',
     'type': 'float',
     'number': 'fp4_e2m1',
     'bits': 4,
     'strategy': 'tensor_group',
     'group_size': 16,
     'block': None,
     'format': 'nvfp4-pack-quantized',
     'input_activations': None,
     'summary': 'fp4 e2m1 weights, an e4m3 scale per 16 inputs times a global scale shared by every fused layer '
                '(NVFP4, weight-only)'},
    {'name': 'mxfp4',
     'label': 'fp4 g32',
     'type': 'float',
     'number': 'fp4_e2m1',
     'bits': 4,
     'strategy': 'group',
     'group_size': 32,
     'block': None,
     'format': 'mxfp4-pack-quantized',
     'input_activations': None,
     'summary': 'fp4 e2m1 weights, a power-of-two (E8M0) scale per 32 inputs (MXFP4, weight-only)'},
    {'name': 'mxfp8',
     'label': 'fp8 g32',
     'type': 'float',
     'number': 'fp8_e4m3',
     'bits': 8,
     'strategy': 'group',
     'group_size': 32,
     'block': None,
     'format': 'mxfp8-quantized',
     'input_activations': None,
     'summary': 'fp8 e4m3 weights, a power-of-two (E8M0) scale per 32 inputs (MXFP8, weight-only)'},
)
# end generated

NAMES: tuple[str, ...] = tuple(row["name"] for row in CATALOG)


def build() -> list[dict]:
    """The catalog's rows, computed from :mod:`qconvert.schemes` (imports torch)."""
    from qconvert.schemes import SCHEMES

    return [
        {"name": s.name, "label": s.label, "type": s.args.number.config_type, "number": s.args.number.value,
         "bits": s.num_bits, "strategy": s.strategy.value, "group_size": s.group_size,
         "block": list(s.block) if s.block else None, "format": s.format.config_format(),
         "input_activations": s.activations, "summary": s.summary}
        for s in SCHEMES.values()
    ]


def _write() -> None:
    import pprint
    from pathlib import Path

    path = Path(__file__)
    text = path.read_text()
    head, _, rest = text.partition("# generated: python -m qconvert.scheme_catalog\n")
    _, _, tail = rest.partition("# end generated\n")
    body = "CATALOG: tuple[dict, ...] = (\n" + "".join(
        "    " + pprint.pformat(row, width=112, sort_dicts=False).replace("\n", "\n    ") + ",\n" for row in build()
    ) + ")\n"
    path.write_text(f"{head}# generated: python -m qconvert.scheme_catalog\n{body}# end generated\n{tail}")


if __name__ == "__main__":
    _write()
