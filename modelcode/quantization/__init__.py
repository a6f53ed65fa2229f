"""Weight-only quantization (int8 per output row, int4 per group of inputs), applied from outside a model
by swapping its `nn.Linear` modules; saving and loading quantized checkpoint folders; quality checks."""

from .linear import (
    INT4_GROUP_SIZES,
    Int4Linear,
    Int8Linear,
    PackedInt4Linear,
    PackedInt8Linear,
    dequantize_int4,
    dequantize_int8,
    dequantized_weight,
    quantize_int4,
    quantize_int8,
)
from .quantize import (
    MODES,
    Scheme,
    pack_layers,
    prepare_to_load,
    quantize,
    read_quantized,
    save_quantized,
    scheme_of,
)

__all__ = [
    "INT4_GROUP_SIZES",
    "MODES",
    "Int4Linear",
    "Int8Linear",
    "PackedInt4Linear",
    "PackedInt8Linear",
    "Scheme",
    "dequantize_int4",
    "dequantize_int8",
    "dequantized_weight",
    "pack_layers",
    "prepare_to_load",
    "quantize",
    "quantize_int4",
    "quantize_int8",
    "read_quantized",
    "save_quantized",
    "scheme_of",
]
