"""One model over several devices of one process: the text decoder's layers in contiguous ranges, one range per
device (docs/architecture.md, "Model placement").

The embeddings sit on the first device, the final norm and the output layer on the last (a tied output layer is the
embedding matrix, so it stays on the first); the ranges are chosen so that the largest share of weight bytes on any
device is as small as it can be. The forward carries the hidden states, the rope tables and the attention bias to a
range's device where the range begins (qwen2vl/text.py `split_points`), and each layer's KV cache is allocated on
its layer's device by the first write, so nothing else in the model knows about devices.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Qwen2VLConfig

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# The share of a GPU's memory the weights may take; the rest holds the KV caches of concurrent questions and
# cached prefixes, and activations (qwen2vl/sizes.py counts GPUs per size with it).
WEIGHT_SHARE = 0.5


@dataclass(frozen=True)
class Stage:
    """Decoder layers [start, end) on one device."""
    device: torch.device
    start: int
    end: int


@dataclass(frozen=True)
class DeviceMap:
    """Where each part of a Qwen2VL lives: the decoder layers in `stages` (contiguous, in order, covering every layer
    once); `visual` None: the caller keeps no vision tower."""
    embed: torch.device
    stages: tuple[Stage, ...]
    norm: torch.device
    head: torch.device
    visual: torch.device | None = None

    def __post_init__(self):
        ends = [s.start for s in self.stages[1:]]
        if not self.stages or self.stages[0].start != 0 or [s.end for s in self.stages[:-1]] != ends \
                or any(s.end <= s.start for s in self.stages):
            raise ValueError(f"stages must be contiguous non-empty layer ranges from 0, got {self.stages}")

    @property
    def layers(self) -> tuple[torch.device, ...]:
        """Layer i's device at index i."""
        return tuple(s.device for s in self.stages for _ in range(s.start, s.end))

    def device_of(self, name: str) -> torch.device:
        """The device of a parameter by its checkpoint name (`visual.*`, `model.*`, `lm_head.*`)."""
        if name.startswith("visual."):
            if self.visual is None:
                raise ValueError(f"{name}: this device map places no vision tower")
            return self.visual
        if name.startswith("model.layers."):
            return self.layers[int(name.split(".")[2])]
        if name.startswith("model.embed_tokens."):
            return self.embed
        if name.startswith("model.norm."):
            return self.norm
        if name.startswith("lm_head."):
            return self.head
        raise ValueError(f"{name} is not a Qwen2VL parameter")

    def split_points(self) -> dict[int, torch.device]:
        """{first layer of each stage: its device}: where the forward carries its tensors over."""
        return {s.start: s.device for s in self.stages}


@dataclass(frozen=True)
class PartBytes:
    """Weight bytes of a model's parts in one dtype."""
    embed: int
    layer: int             # one decoder layer (all are the same size)
    norm: int
    head: int              # 0 when tied to the embeddings
    visual: int


def part_bytes(config: Qwen2VLConfig, dtype: torch.dtype) -> PartBytes:
    """From the model built on the meta device (no memory), so the sizes follow the code."""
    from .model import Qwen2VL

    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {list(_BYTES)}, got {dtype}")
    with torch.device("meta"):
        model = Qwen2VL(config)
    size = _BYTES[dtype]

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) * size

    return PartBytes(embed=count(model.model.embed_tokens), layer=count(model.model.layers[0]),
                     norm=count(model.model.norm),
                     head=0 if config.text.tie_word_embeddings else count(model.lm_head),
                     visual=count(model.visual))


def plan_devices(config: Qwen2VLConfig, devices, *, dtype: torch.dtype = torch.bfloat16, visual=None,
                 memory_per_device: int | None = None) -> DeviceMap:
    """The decoder's layers over `devices` (in order) in contiguous ranges, balanced by weight bytes.

    visual: the vision tower's device (None: no tower). memory_per_device: bytes each device may hold of weights;
    ValueError when the busiest device would need more, or when there are more devices than layers (a device
    without a layer would only move tensors)."""
    devices = [torch.device(d) for d in devices]
    n_layers = config.text.num_hidden_layers
    if not devices:
        raise ValueError("plan_devices needs at least one device")
    if len(devices) > n_layers:
        raise ValueError(f"cannot split {n_layers} decoder layers over {len(devices)} devices: at most one device "
                         "per layer")
    parts = part_bytes(config, dtype)
    visual = None if visual is None else torch.device(visual)
    fixed = [0] * len(devices)                       # bytes on each device besides its layers
    fixed[0] += parts.embed
    fixed[-1] += parts.norm + parts.head
    if visual is not None and visual in devices:
        fixed[devices.index(visual)] += parts.visual
    counts = _balanced_counts(n_layers, parts.layer, fixed)
    loads = [f + c * parts.layer for f, c in zip(fixed, counts)]
    if memory_per_device is not None and max(loads) > memory_per_device:
        worst = loads.index(max(loads))
        raise ValueError(f"the model does not fit: {devices[worst]} would hold {max(loads) / 2**30:.1f} GiB of "
                         f"weights in {str(dtype).removeprefix('torch.')} but each device may hold "
                         f"{memory_per_device / 2**30:.1f} GiB; use more devices or a smaller dtype")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    stages = tuple(Stage(d, s, s + c) for d, s, c in zip(devices, starts, counts))
    head = devices[0] if config.text.tie_word_embeddings else devices[-1]
    return DeviceMap(embed=devices[0], stages=stages, norm=devices[-1], head=head, visual=visual)


def _balanced_counts(n_layers: int, layer_bytes: int, fixed: list[int]) -> list[int]:
    """Layers per device (each >= 1, summing to n_layers) minimising the largest load fixed[d] + count * layer_bytes.

    Dynamic programming over (devices used, layers placed); ties go to the earlier devices holding fewer layers."""
    k = len(fixed)
    inf = float("inf")
    # best[d][n]: the smallest possible max load placing the first n layers on the first d devices
    best = [[inf] * (n_layers + 1) for _ in range(k + 1)]
    choice = [[0] * (n_layers + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for d in range(1, k + 1):
        for n in range(d, n_layers - (k - d) + 1):
            for c in range(1, n - (d - 1) + 1):
                load = max(best[d - 1][n - c], fixed[d - 1] + c * layer_bytes)
                if load < best[d][n]:
                    best[d][n], choice[d][n] = load, c
    counts, n = [], n_layers
    for d in range(k, 0, -1):
        counts.append(choice[d][n])
        n -= choice[d][n]
    return counts[::-1]


def plan_gpus(config: Qwen2VLConfig | str | Path, gpus: int, dtype: torch.dtype, *,
              visual: bool = True) -> DeviceMap | None:
    """The layers over cuda:0..gpus-1 (the GPUs Ray gave this process), None for one GPU; visual: the vision tower
    goes on cuda:0 beside the embeddings (its image tokens enter there), False: no tower. Each GPU may hold
    WEIGHT_SHARE of its memory in weights; ValueError when fewer GPUs are visible or the model does not fit."""
    if gpus == 1:
        return None
    if not isinstance(config, Qwen2VLConfig):
        config = Qwen2VLConfig.from_json(config)
    visible = torch.cuda.device_count()
    if visible < gpus:
        raise ValueError(f"{gpus} GPUs asked for but this process sees {visible}")
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
    return plan_devices(config, [f"cuda:{i}" for i in range(gpus)], dtype=dtype, visual="cuda:0" if visual else None,
                        memory_per_device=int(memory * WEIGHT_SHARE))


def place_(model, device_map: DeviceMap):
    """Move a built Qwen2VL's parts to their devices (tests and small models; a checkpoint loads straight onto
    them: qwen2vl/checkpoint.py load_pretrained(device_map=...)). Returns the model."""
    text = model.model
    if len(device_map.layers) != len(text.layers):
        raise ValueError(f"the device map places {len(device_map.layers)} layers, the model has {len(text.layers)}")
    text.embed_tokens.to(device_map.embed)
    for layer, device in zip(text.layers, device_map.layers):
        layer.to(device)
    text.norm.to(device_map.norm)
    if model.lm_head.weight is not text.embed_tokens.weight:
        model.lm_head.to(device_map.head)
    if model.visual is not None and device_map.visual is not None:
        model.visual.to(device_map.visual)
    text.split_points = device_map.split_points()
    return model


__all__ = ["WEIGHT_SHARE", "DeviceMap", "PartBytes", "Stage", "part_bytes", "place_", "plan_devices", "plan_gpus"]
