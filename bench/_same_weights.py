"""Ours and the transformers reference with the same random weights, one at a time on the device (bench/serve_gpu.py).

A seeded random state dict is generated tensor by tensor on the device. Ours holds those tensors as its parameters
(the loader's last step, qwen2vl/checkpoint.py `load_pretrained`, on a state in memory); the reference is built
after ours is freed and the same tensors, generated again from the seed, are copied into it one at a time, so the
device never holds two copies of a 7B (~16 GB in bf16). A checksum of every tensor proves both saw the same weights.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from qwen2vl.checkpoint import WEIGHTS_FILE, new_name
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model import Qwen2VL
from qwen2vl.processor import write_preprocessor_config
from qwen2vl.vision import VisionTransformer


def tensor_shapes(config: Qwen2VLConfig) -> dict[str, torch.Size]:
    """Every stored tensor's name (original scheme) and shape, from our model built on the meta device."""
    with torch.device("meta"):
        model = Qwen2VL(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if config.text.tie_word_embeddings:            # a tied checkpoint stores no output layer (docs/model.md §10)
        del shapes["lm_head.weight"]
    return shapes


def random_tensors(config: Qwen2VLConfig, dtype: torch.dtype, device: torch.device,
                   seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in a fixed order, the same for the same seed: matrices N(0, 1/fan_in), embeddings
    N(0, 0.02^2), biases N(0, 0.02^2), norm weights 1 + N(0, 0.02^2) (weights that keep bf16 activations finite
    through 80 layers; values do not change the cost)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in tensor_shapes(config).items():
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if len(shape) >= 2 and "embed_tokens" not in name:
            noise *= shape[1:].numel() ** -0.5
        else:
            noise *= 0.02
            if len(shape) == 1 and not name.endswith("bias"):
                noise += 1.0
        yield name, noise.to(dtype)


def checksum(t: torch.Tensor) -> float:
    return float(t.float().sum())


def build_ours(config: Qwen2VLConfig, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[Qwen2VL, float]:
    """Our model on `device` holding the seeded random tensors as its parameters, and their checksum."""
    state, total = {}, 0.0
    for name, tensor in random_tensors(config, dtype, device, seed):
        state[name] = tensor
        total += checksum(tensor)
    with torch.device("meta"):
        model = Qwen2VL(config)
    with torch.device(device):                      # real, so its rotary tables (buffers, fp32) exist
        model.visual = VisionTransformer(config.vision)
    if config.text.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False), total


def build_reference(config: Qwen2VLConfig, dtype: torch.dtype, device: torch.device, seed: int, attention: str):
    """transformers' Qwen2VLForConditionalGeneration with the same tensors (copied in one at a time), and their
    checksum. Its config is read from our config.json layout, as from_pretrained reads a checkpoint's."""
    from transformers import Qwen2VLConfig as RefConfig, Qwen2VLForConditionalGeneration

    ref_config = RefConfig.from_dict(config.to_dict())
    for part in (ref_config, ref_config.text_config, ref_config.vision_config):   # the towers are built in their own
        part.dtype = dtype
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(ref_config, dtype=dtype, attn_implementation=attention)
    params = model.state_dict()
    untouched = set(params) - ({"lm_head.weight"} if config.text.tie_word_embeddings else set())
    total = 0.0
    with torch.no_grad():
        for name, tensor in random_tensors(config, dtype, device, seed):
            params[new_name(name)].copy_(tensor)
            untouched.discard(new_name(name))
            total += checksum(tensor)
            del tensor
    if untouched:
        raise RuntimeError(f"reference tensors without a value: {sorted(untouched)[:5]}")
    model.generation_config.pad_token_id = config.bos_token_id
    return model.eval().requires_grad_(False), total


def write_vision_checkpoint(model: Qwen2VL, folder: Path) -> Path:
    """config.json, preprocessor_config.json and only the tower's tensors: what an encoder actor loads
    (qwen2vl.load_vision reads nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    write_preprocessor_config(folder)
    state = {f"visual.{name}": t.detach().to("cpu").contiguous() for name, t in model.visual.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def release(device: torch.device) -> None:
    """Give the device back the memory of models the caller has just dropped (`del`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
