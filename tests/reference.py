"""Test helpers: tiny REFERENCE Qwen2-VL checkpoints built with transformers 4.57.6 (the numerical oracle), and
answering_checkpoint (ours, for tests comparing answer text).

The reference init zeroes biases and sets norm weights to 1, which hides bugs (a swapped M-RoPE section moves the
logits by only ~3e-3), so every parameter is re-drawn before saving: matrices N(0, 1/fan_in), embeddings 0.5*N(0, 1),
biases 0.1*N(0, 1), norm weights 1 + 0.1*N(0, 1). Saved with save_pretrained, read back by ours with load_pretrained.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653
PAD = 151643
VOCAB = 151680            # > 151656 so the real special ids are rows of the embedding

TEXT_DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rope_theta=1e6, mrope_section=[2, 3, 3], tie_word_embeddings=False,
                     vocab_size=VOCAB, rms_norm_eps=1e-6)
VISION_DEFAULTS = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=4)


def reference_config(vision: dict | None = None, **text):
    """transformers Qwen2VLConfig for a tiny model; `text` overrides TEXT_DEFAULTS, `vision` VISION_DEFAULTS."""
    from transformers import Qwen2VLConfig
    t = {**TEXT_DEFAULTS, **text}
    mrope = t.pop("mrope_section")
    v = {**VISION_DEFAULTS, **(vision or {}), "hidden_size": t["hidden_size"]}
    return Qwen2VLConfig(vision_config=v, rope_scaling={"type": "mrope", "mrope_section": mrope},
                         image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                         vision_end_token_id=VISION_END, bos_token_id=PAD, eos_token_id=151645,
                         pad_token_id=PAD, **t)


def build_reference_model(seed: int = 0, vision: dict | None = None, **text):
    from transformers import Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(reference_config(vision, **text))
    perturb_(model, seed)
    return model.eval()


def perturb_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in seen:       # tied lm_head
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen)
            if "embed_tokens" in name:
                p.copy_(noise * 0.5)
            elif p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1.0 + noise * 0.1)


def save_reference(model, directory: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                   naming: str = "original") -> Path:
    """save_pretrained in `dtype` (bf16 files hold rounded weights that both sides then read); naming='new' rewrites
    the stored keys to the newer `model.visual.*` / `model.language_model.*` scheme."""
    directory = Path(directory)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    model.to(torch.float32)
    if naming == "new":
        _rename_to_new_scheme(directory)
    return directory


def load_reference(directory: Path):
    from transformers import Qwen2VLForConditionalGeneration
    return Qwen2VLForConditionalGeneration.from_pretrained(directory, attn_implementation="eager",
                                                           dtype=torch.float32).eval()


def _new_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def _rename_to_new_scheme(directory: Path) -> None:
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(file))
        save_file({_new_name(k): v for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_new_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))


def answering_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint whose output layer only favours ids the tiny tokenizer can spell.

    The tiny tokenizer has ~1000 tokens but the model 151680 rows; zeroing the rows of ids without text makes
    greedy answers decode to non-empty text, so tests comparing answer strings compare something.
    """
    import qwen2vl

    path = qwen2vl.write_tiny_checkpoint(folder, seed=seed)
    vocab = len(qwen2vl.Processor.from_pretrained(path).tokenizer)
    weights = load_file(str(path / "model.safetensors"))
    lm_head = weights["lm_head.weight"].clone()
    lm_head[1000:151643] = 0.0
    weights["lm_head.weight"] = lm_head
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert vocab > 1000
    return path


# ---- prompts -------------------------------------------------------------------------------------------------

def answer_text(model, processor, new_ids: torch.Tensor) -> str:
    """The text of generated ids up to the first of the model's stop ids (what Decoder.ask answers)."""
    stops = set(model.generation_config.eos_token_id)
    kept = []
    for t in new_ids.tolist():
        if t in stops:
            break
        kept.append(t)
    return processor.decode(kept, skip_special_tokens=True)


def build_prompt(parts, *, seed: int = 0, patch_dim: int = 1176, merge: int = 2):
    """parts: ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)) in prompt order.

    Returns dict(input_ids (1, S), image/video grids (n, 3) or None, pixel rows (N, patch_dim) or None).
    Vision items are <|vision_start|> + t*h*w/merge^2 pads + <|vision_end|>; text ids are ordinary tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    grids = {"image": [], "video": []}
    for kind, arg in parts:
        if kind == "text":
            ids += torch.randint(0, 5000, (arg,), generator=gen).tolist()
        else:
            t, h, w = arg
            ids += [VISION_START] + [IMAGE_PAD if kind == "image" else VIDEO_PAD] * (t * h * w // merge ** 2)
            ids += [VISION_END]
            grids[kind].append(list(arg))
    out = {"input_ids": torch.tensor([ids])}
    for kind, pix_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            out[grid_key] = grid
            out[pix_key] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
    return out


def left_pad(rows: list[torch.Tensor], pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (input_ids, attention_mask), both (B, max_len), padded on the left."""
    width = max(r.shape[0] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return ids, mask
