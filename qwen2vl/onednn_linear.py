"""nn.Linear whose fp32 CPU inference runs oneDNN's matmul kernel instead of BLAS.

torch's CPU `F.linear` in fp32 calls a BLAS GEMM. oneDNN (bundled with torch's x86 and aarch64 builds) computes the
same product from the same row-major weight, and on the 2-core AVX-512 machine the project is measured on it is
faster at every row count a decoder sees (summed over the four (out, in) shapes of the bench config's layers):
1.7-2.3x for one decoding token, 1.6-1.7x for a ~20-token question, 1.3-1.4x for a 2,000-token prefill. Results
are fp32 with another summation order (relative differences ~1e-6, the size of the differences between BLAS kernels).
Converting the weight with `to_mkldnn()` first measured no faster, so the weight stays an ordinary parameter: the
module saves, loads, ties and moves like the nn.Linear it was, and takes no extra memory.

`use_onednn_linears_(module)` turns every plain nn.Linear below `module` into a OneDNNLinear in place. Anything else
(training with autograd, fp16/bf16, a GPU) takes F.linear, as a plain nn.Linear does (docs/model.md §14).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_available() -> bool:
    """True when this torch build can run oneDNN fp32 linears on this CPU."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
        return bool((out == 3).all())
    except RuntimeError:
        return False


class OneDNNLinear(nn.Linear):
    """y = x @ W.T + b; x (..., in) -> (..., out). oneDNN for fp32 CPU inference, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32
                or x.device.type != "cpu" or w.device.type != "cpu"
                or (b is not None and (b.dtype != torch.float32 or b.device.type != "cpu" or not b.is_contiguous()))):
            return F.linear(x, w, b)     # the op has no autograd formula and reads the bias as dense fp32
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


def use_onednn_linears_(module: nn.Module) -> int:
    """Make every plain nn.Linear below `module` a OneDNNLinear (same parameters, same object); returns how many.
    0 when this torch build or CPU has no oneDNN fp32 linear."""
    if not onednn_available():
        return 0
    changed = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear          # a forward swap only: parameters, hooks and state_dict stay as they are
            changed += 1
    return changed
