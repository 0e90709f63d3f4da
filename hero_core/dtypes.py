"""The one table of tensor dtypes by name: records at rest (`hero_core.serialization`),
model loading (`hero_core.models`) and the wire codec (`services.common.codec`) all read
it."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
MODEL_DTYPES = ("float32", "float16", "bfloat16")
"""The dtypes a model's weights may be loaded in."""
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
