"""Weight dtypes by name, and "auto": bf16 where the device computes it natively (CUDA GPUs that support it), fp32
elsewhere (a CPU computes bf16 matmuls slower than fp32, and the greedy head's exact fast path is fp32-only:
docs/model.md §14)."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_NAMES = ("auto", *DTYPES)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The torch dtype of `name` ("auto", a DTYPES name or alias, or a dtype) for weights on `device`."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name}")
        return name
    key = ALIASES.get(name, name)
    if key == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPES[key]


__all__ = ["DTYPES", "DTYPE_NAMES", "resolve_dtype"]
