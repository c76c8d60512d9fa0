"""Linear layers whose fp32 weights are stored in oneDNN's blocked layout, for inference on CPU.

torch's CPU `F.linear` in fp32 calls a BLAS GEMM on the plain row-major weight. oneDNN (bundled with torch's x86 and
aarch64 builds) runs the same fp32 product from a weight laid out once for its kernels, and on the 2-core AVX-512
machine the project is measured on that is faster at every row count a decoder sees (measured per (out, in) layer of
the bench config): 1.6-2.4x for one decoding token, 1.4-1.7x for a ~20-token question, 1.3x for a 2,000-token
prefill. Results are fp32 with another summation order (relative differences ~1e-6, the size of the differences
between BLAS kernels).

`pack_linears_(module)` swaps each fp32 CPU nn.Linear below `module` for a PackedLinear and drops the plain weight,
so memory does not grow. It is for inference only: packed layers have no parameters to train, save or move, and
modules that read a linear's `.weight` themselves (the vision tower's fused blocks) must not be packed.
"""
from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    """True when this torch build can run oneDNN fp32 linears on this CPU."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x = torch.ones(2, 3)
        w = torch.ones(4, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, w.to_mkldnn(), None, "none", [], "")
        return bool((out == 3).all())
    except RuntimeError:
        return False


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held as a oneDNN tensor; x (..., in) fp32 on CPU -> (..., out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear needs an fp32 CPU weight, got {weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = weight.to_mkldnn()                                   # (out, in), blocked layout
        self.bias = None if linear.bias is None else linear.bias.detach().clone()   # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) input, got {tuple(x.shape)}")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears_(module: nn.Module) -> int:
    """Replace every fp32 CPU nn.Linear below `module` by a PackedLinear; returns how many were replaced (0 when
    oneDNN is unavailable). Layers whose weight is shared with another module (a tied output layer) are left alone."""
    if not packing_available():
        return 0
    counts: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Linear) and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu" and counts.get(id(child.weight)) == 1):
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
