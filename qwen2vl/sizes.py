"""The released sizes (2B, 7B, 72B) as configs, and what serving one costs in memory: weights, KV cache per token.

Parameter counts come from the model itself built on the meta device (no memory), so they follow the code; the
configs are the hub files' values (docs/model.md §5-6). `serving_table` is the README's sizing table.
"""
from __future__ import annotations

import torch

from .config import Qwen2VLConfig, TextConfig, VisionConfig

_TEXT = {
    "2B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "72B": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
SIZES = tuple(_TEXT)
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def released_config(size: str) -> Qwen2VLConfig:
    """The config.json of Qwen/Qwen2-VL-{size}-Instruct."""
    text = _TEXT[size]
    return Qwen2VLConfig(vision=VisionConfig(hidden_size=text["hidden_size"]), text=TextConfig(**text))


def parameter_counts(config: Qwen2VLConfig) -> dict[str, int]:
    """{"vision": n, "text": n (embeddings, layers, norm, output layer unless tied)} of our model for `config`."""
    from .model import Qwen2VL

    with torch.device("meta"):
        model = Qwen2VL(config)
    vision = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())           # a tied output layer is one tensor, counted once
    return {"vision": vision, "text": total - vision}


def kv_bytes_per_token(config: Qwen2VLConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V one token leaves in every layer's cache."""
    t = config.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * BYTES[dtype]


def serving_table(prompt_tokens: int, answer_tokens: int) -> list[dict]:
    """Rows per size x dtype: GiB of weights (decoder replica: text and tower, which it runs on uploaded images;
    encoder actor: the tower), MiB of KV per
    1,000 cached visual tokens, and GiB per concurrent question whose footage no other question shares (a prompt
    of `prompt_tokens` and an answer of `answer_tokens`)."""
    rows = []
    for size in SIZES:
        config = released_config(size)
        counts = parameter_counts(config)
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            per_token = kv_bytes_per_token(config, dtype)
            rows.append({"checkpoint": f"Qwen2-VL-{size}-Instruct", "dtype": name,
                         "decoder_weights_gib": (counts["text"] + counts["vision"]) * BYTES[dtype] / 2**30,
                         "encoder_weights_gib": counts["vision"] * BYTES[dtype] / 2**30,
                         "kv_per_1k_tokens_mib": 1000 * per_token / 2**20,
                         "per_question_gib": (prompt_tokens + answer_tokens) * per_token / 2**30})
    return rows


def gpus_needed(config: Qwen2VLConfig, dtype: torch.dtype, gpu_bytes: int) -> int:
    """GPUs of `gpu_bytes` each that one decoder replica splits its layers over (qwen2vl/placement.py): the fewest on
    which no GPU holds more than WEIGHT_SHARE of its memory in weights. ValueError when no count does."""
    from .placement import WEIGHT_SHARE, plan_devices

    for n in range(1, config.text.num_hidden_layers + 1):
        try:
            plan_devices(config, [f"cuda:{i}" for i in range(n)], dtype=dtype,
                         memory_per_device=int(gpu_bytes * WEIGHT_SHARE))
        except ValueError:
            continue
        return n
    raise ValueError(f"no number of {gpu_bytes / 2**30:.0f} GiB GPUs holds this model's layers")


def gpu_table(gpu_gib: float) -> str:
    """Markdown: GPUs of `gpu_gib` GiB per decoder replica for each size and dtype."""
    rows = "".join(f"| Qwen2-VL-{size}-Instruct | {name} | "
                   f"{gpus_needed(released_config(size), dtype, int(gpu_gib * 2**30))} |\n"
                   for size in SIZES for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")))
    return f"| checkpoint | dtype | GPUs of {gpu_gib:g} GiB per decoder replica |\n|---|---|---|\n" + rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| checkpoint | dtype | decoder weights | encoder weights | KV per 1k cached tokens | per concurrent "
            "question |\n|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['checkpoint']} | {r['dtype']} | {r['decoder_weights_gib']:.1f} GiB | {r['encoder_weights_gib']:.2f} GiB "
        f"| {r['kv_per_1k_tokens_mib']:.1f} MiB | {r['per_question_gib']:.2f} GiB |\n" for r in rows)


__all__ = ["SIZES", "gpu_table", "gpus_needed", "kv_bytes_per_token", "markdown_table", "parameter_counts",
           "released_config", "serving_table"]
