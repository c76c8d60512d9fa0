"""How answers are generated: the checkpoint's generation_config.json, then what a request overrides, within limits.

Qwen2-VL's released checkpoints ask for a repetition penalty (1.05) and sampling so narrow (top_k 1) that it is
greedy in effect; a checkpoint may ask for anything else. `answer_sampling` merges those defaults with a request's
overrides and checks both against LIMITS, so a request cannot ask for a temperature of 50 or a penalty that
forbids every token seen. A temperature of 0 (or a checkpoint with do_sample false and no override) is greedy.
Search scoring and captions never go through here: they stay greedy (docs/architecture.md, "Answers").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# inclusive bounds a request may ask for (top_p: > 0)
LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (0, 1000), "repetition_penalty": (1.0, 2.0),
          "seed": (0, 2**63 - 1)}
FIELDS = tuple(LIMITS)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0                # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                          # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None                 # sampling only: the same seed, footage and question give the same answer

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self, device: torch.device | str) -> dict:
        """Keyword arguments of qwen2vl.generate."""
        kwargs = {"repetition_penalty": self.repetition_penalty}
        if self.greedy:
            return kwargs
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "generator": generator}

    def to_dict(self) -> dict:
        return asdict(self)


def answer_sampling(defaults, overrides: dict | None = None) -> Sampling:
    """The sampling of one answer: the checkpoint's `defaults` (qwen2vl GenerationDefaults), then `overrides`
    (FIELDS only; None values are not given). ValueError naming the field for anything outside LIMITS."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown generation settings {sorted(unknown)}; known: {', '.join(FIELDS)}")
    base = {"temperature": defaults.temperature if defaults.do_sample else 0.0, "top_p": defaults.top_p,
            "top_k": defaults.top_k, "repetition_penalty": defaults.repetition_penalty}
    # the checkpoint's own values are clamped into the limits (a file may say 0 for top_p: "off" to some writers);
    # a request's are checked
    base = {k: _clamp(k, v) for k, v in base.items()}
    for name, value in overrides.items():
        _check(name, value)
    return Sampling(**{**base, **overrides})


def _check(name: str, value) -> None:
    lo, hi = LIMITS[name]
    integral = name in ("top_k", "seed")
    if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) \
            or not lo <= value <= hi or (name == "top_p" and value == 0):
        shown = f"({lo}, {hi}]" if name == "top_p" else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be {'an int' if integral else 'a number'} in {shown}, got {value!r}")


def _clamp(name: str, value):
    lo, hi = LIMITS[name]
    if name == "top_p" and not 0 < value <= 1:
        return 1.0
    return min(max(value, lo), hi)


__all__ = ["FIELDS", "LIMITS", "Sampling", "answer_sampling"]
