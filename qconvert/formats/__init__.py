"""The on-disk weight formats, one registered class each (see :mod:`qconvert.formats.base`).

Importing this package registers every format; recognition on read tries them in this order.
"""

# Registering: defining a format class registers it (the more specific readers first).
from qconvert.formats import microscaled, tiled  # noqa: F401
from qconvert.formats.args import Algorithm, Layout, NumberType, QuantArgs, ScaleDtype, Strategy
from qconvert.formats.base import (
    ACTIVATION_LEAVES,
    FORMATS,
    WEIGHT_LEAVES,
    ReadContext,
    StoredLayer,
    WeightFormat,
    config_group,
    recognise,
)

__all__ = [
    "ACTIVATION_LEAVES",
    "FORMATS",
    "WEIGHT_LEAVES",
    "Algorithm",
    "Layout",
    "NumberType",
    "QuantArgs",
    "ReadContext",
    "ScaleDtype",
    "StoredLayer",
    "Strategy",
    "WeightFormat",
    "config_group",
    "recognise",
]
