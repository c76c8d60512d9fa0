"""Exact greedy token choice over an fp32 output layer, reading mostly a half-precision copy of its weights.

Decoding one token is memory bound on the output layer: at a 152k vocabulary it reads vocab x hidden weights, and
for a small text model that is most of the step (fp32: 622 MB per token at hidden 1024). Greedy decoding only needs
the argmax, so we screen with an fp16 copy (half the bytes) and recompute in fp32 only the rows that can still win.
With a_r = fp16(x) . fp16(W_r) (fp32 accumulation, output rounded to fp16), for every row r

  |x . W_r - a_r| <= C + 2^-11 |a_r|,   C = ||x|| max_r(||W_r - fp16(W_r)|| + 2 n 2^-24 ||W_r||)
                                            + ||x - fp16(x)|| max_r ||fp16(W_r)|| + 2^-24

(representation error by Cauchy-Schwarz, fp32 sums on both sides, output rounding). The winner w of the full fp32
logits satisfies a_w + C + 2^-11|a_w| >= a_m - C - 2^-11|a_m| for m = argmax a, which is one threshold on a; those
rows get fp32 logits and the argmax among them is the token of the full output layer (up to fp32 summation order,
which already differs between GEMM kernels; ties go to the lowest id, as torch.argmax does). The screen is three
passes over fp16 logits and a scalar bound, so it stays cheap next to the GEMV. Candidate sets typically hold a
handful of rows; when a step's set is large (near-flat logits) or a value does not fit fp16, that step uses the full
fp32 output layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_FP16_MAX = 65504.0
_U16 = 2.0 ** -11              # unit roundoff of fp16 outputs
_U32 = 2.0 ** -24              # unit roundoff of fp32 sums


class ArgmaxHead:
    """argmax(hidden @ weight.T) for an fp32 weight (vocab, hidden); hidden (B, hidden) -> token ids (B,)."""

    def __init__(self, weight: torch.Tensor, max_candidates: int = 1024):
        if weight.ndim != 2 or weight.dtype != torch.float32:
            raise ValueError(f"ArgmaxHead needs an fp32 (vocab, hidden) weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        if not bool(weight.abs().max() <= _FP16_MAX):
            raise ValueError("output weights exceed the fp16 range (or are not finite); use the full output layer")
        self.weight = weight                                               # (V, D) fp32, shared with the model
        self.max_candidates = max_candidates
        with torch.no_grad():
            self.half = weight.to(torch.float16)                           # (V, D)
            half32 = self.half.float()
            sums = 2 * weight.shape[1] * _U32 * weight.norm(dim=1)         # (V,) fp32 summation error per unit ||x||
            self.row_error = float(((weight - half32).norm(dim=1) + sums).max())
            self.half_norm = float(half32.norm(dim=1).max())
        self.fallbacks = 0
        self.candidates_seen = 0

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.ndim != 2 or hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(f"hidden must be (batch, {self.weight.shape[1]}), got {tuple(hidden.shape)}")
        x = hidden.to(torch.float32)                                       # (B, D)
        if not bool(torch.isfinite(x).all()) or not bool(x.abs().max() <= _FP16_MAX):
            return self._full(x)
        x_half = x.to(torch.float16)
        approx = F.linear(x_half, self.half)                               # (B, V) fp16
        x_norm = x.norm(dim=1).tolist()
        x_err = (x - x_half.float()).norm(dim=1).tolist()
        top = approx.amax(dim=1).float().tolist()
        tokens = []
        for b in range(x.shape[0]):
            c = x_norm[b] * self.row_error + x_err[b] * self.half_norm + _U32
            floor = top[b] - _U16 * abs(top[b]) - 2 * c                    # the winner's a_r + 2^-11|a_r| reaches this
            threshold = floor / (1 + _U16) if floor >= 0 else floor / (1 - _U16)
            threshold -= abs(threshold) * 2 * _U16 + _U32                   # so rounding it to fp16 cannot raise it
            if not math.isfinite(threshold):                               # fp16 logits overflowed
                tokens.append(self._full(x[b:b + 1]))
                continue
            rows = torch.nonzero(approx[b] >= threshold).view(-1)          # ascending ids
            self.candidates_seen += rows.numel()
            if rows.numel() > self.max_candidates:                         # near-flat logits
                tokens.append(self._full(x[b:b + 1]))
                continue
            exact = self.weight.index_select(0, rows) @ x[b]               # (C,) fp32 logits of the candidates
            tokens.append(rows[exact.argmax()].view(1))
        return torch.cat(tokens)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        self.fallbacks += 1
        return F.linear(x, self.weight).argmax(dim=-1)
