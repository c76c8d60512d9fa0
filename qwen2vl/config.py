"""Qwen2-VL configuration read from a checkpoint's config.json (every layout seen in the wild).

Hub files are flat with rope_scaling={"type": "mrope", ...}; transformers 4.57 also writes a nested
text_config and rewrites the rope type to "default"; 5.x writes rope_parameters. We read mrope_section
wherever it is and never key on the rope type (docs/model.md §10).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)
MODEL_TYPES = ("qwen2_vl",)


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280           # ViT width
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_size: int = 3584         # merger output width = LLM hidden (NOT the ViT width; Qwen2.5-VL differs)
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:     # 1176 for the released models
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str = "bfloat16"   # dtype of the stored weights

    def __post_init__(self):
        t = self.text
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if self.vision.hidden_size != t.hidden_size:
            raise ValueError(f"vision_config.hidden_size {self.vision.hidden_size} != text hidden_size {t.hidden_size}")

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2VLConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if (archs and not any(a in ARCHITECTURES for a in archs)) or (model_type and model_type not in MODEL_TYPES):
            raise ValueError(
                f"not a Qwen2-VL checkpoint: architectures={archs} model_type={model_type!r} "
                f"(expected {ARCHITECTURES[0]} / {MODEL_TYPES[0]})")
        text_d = {**d, **(d.get("text_config") or {})}   # flat hub keys, nested 4.57+ keys win
        vis_d = dict(d.get("vision_config") or {})
        if "in_chans" in vis_d and "in_channels" not in vis_d:
            vis_d["in_channels"] = vis_d["in_chans"]
        vision = VisionConfig(**{k: vis_d[k] for k in VisionConfig.__dataclass_fields__ if k in vis_d})
        text_kw = {k: text_d[k] for k in TextConfig.__dataclass_fields__ if k in text_d and k != "mrope_section"}
        text_kw["mrope_section"] = _find_mrope_section(d)
        text = TextConfig(**text_kw)
        if "hidden_size" not in vis_d:
            vision.hidden_size = text.hidden_size
        top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                 "vision_token_id", "bos_token_id", "eos_token_id", "torch_dtype") if d.get(k) is not None}
        if "dtype" in d and "torch_dtype" not in top:
            top["torch_dtype"] = d["dtype"]
        return cls(vision=vision, text=text, **top)

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2VLConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- writing (the hub's flat layout, which every reader accepts) ---------------------------------------
    def to_dict(self) -> dict:
        text = asdict(self.text)
        mrope = text.pop("mrope_section")
        vision = asdict(self.vision)
        return {
            "architectures": list(ARCHITECTURES),
            "model_type": MODEL_TYPES[0],
            **text,
            "rope_scaling": {"type": "mrope", "mrope_section": list(mrope)},
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }


def _find_mrope_section(d: dict) -> list[int]:
    for holder in (d.get("text_config") or {}, d):
        for key in ("rope_scaling", "rope_parameters"):
            rope = holder.get(key) or {}
            if isinstance(rope, dict) and rope.get("mrope_section"):
                return list(rope["mrope_section"])
    raise ValueError("config.json has no mrope_section (looked in rope_scaling and rope_parameters)")
