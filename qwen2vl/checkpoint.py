"""Checkpoints in the Hugging Face layout: load (names, shards, ties, dtypes) and write tiny random ones (docs/model.md §10-11)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Qwen2VLConfig, TextConfig, VisionConfig
from .model import GenerationDefaults, Qwen2VL
from .placement import DeviceMap
from .vision import VisionTransformer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The two weight-name schemes (docs/model.md §10): (original prefix, newer transformers prefix), read both ways.
NAME_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."))


# ---- loading ---------------------------------------------------------------------------------------------------

def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    device_map: DeviceMap | None = None) -> Qwen2VL:
    """A Qwen2VL from a local HF-layout folder (config.json + model.safetensors or shards + index), in eval mode.

    device_map (qwen2vl/placement.py): each tensor goes straight to its part's device instead of `device`; a map
    without a vision tower leaves `model.visual` None."""
    path = Path(path)
    config = _read_config(path)

    # Text weights are allocated by the load itself (meta first); the vision tower is built for real so that its
    # non-persistent buffers (rotary tables) exist, then its parameters are replaced by the loaded ones.
    with torch.device("meta"):
        model = Qwen2VL(config)
    visual_device = device if device_map is None else device_map.visual
    if visual_device is not None:
        with torch.device(visual_device):
            model.visual = VisionTransformer(config.vision)
    else:
        model.visual = None
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tied = config.text.tie_word_embeddings
    placement = (lambda name: device) if device_map is None else device_map.device_of
    state = _read_state_dict(path, expected, tied, dtype, placement, skip="visual." if visual_device is None else None)
    if tied:   # no lm_head tensor in tied files (docs/model.md §10): share the embedding
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if device_map is not None:
        model.model.split_points = device_map.split_points()
    model.generation_config = read_generation_config(path, config)
    return model.eval().requires_grad_(False)


def load_vision(path: str | Path, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> VisionTransformer:
    """Only the vision tower, reading only the `visual.*` tensors: what encoder actors need (a 7B checkpoint's text
    weights would be ~15 GB read and held for nothing). `.cfg` is its VisionConfig."""
    path = Path(path)
    config = _read_config(path)
    with torch.device(device):
        visual = VisionTransformer(config.vision)
    expected = {f"visual.{name}": t.shape for name, t in visual.state_dict().items()}
    state = _read_state_dict(path, expected, False, dtype, lambda name: device, only="visual.")
    visual.load_state_dict({name[len("visual."):]: t for name, t in state.items()}, strict=True, assign=True)
    return visual.eval().requires_grad_(False)


def _read_config(path: Path) -> Qwen2VLConfig:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return Qwen2VLConfig.from_json(config_file)


def _read_state_dict(path: Path, expected: dict, tied: bool, dtype, placement,
                     only: str | None = None, skip: str | None = None) -> dict[str, torch.Tensor]:
    """placement: a tensor's (original) name -> its device. only: read just the tensors whose name starts with this
    prefix; skip: leave out those that do (neither kind is read)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for stored_name in f.keys():
                name = original_name(stored_name)
                if (only is not None and not name.startswith(only)) or (skip is not None and name.startswith(skip)):
                    continue
                if tied and name == "lm_head.weight":
                    continue                      # some tied files carry a copy; the tie wins
                if name not in expected:
                    raise ValueError(f"unexpected tensor {stored_name} in {file.name}: not a Qwen2-VL weight "
                                     "for this config.json")
                if name in state:
                    raise ValueError(f"tensor {name} appears twice (again as {stored_name} in {file.name})")
                tensor = f.get_tensor(stored_name)
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise ValueError(f"shape mismatch for {stored_name} in {file.name}: file has "
                                     f"{tuple(tensor.shape)}, config.json implies {tuple(expected[name])}")
                state[name] = tensor.to(device=placement(name), dtype=dtype)
    missing = [n for n in expected if n not in state and not (tied and n == "lm_head.weight")
               and not (skip is not None and n.startswith(skip))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path} is missing tensors: {', '.join(missing[:5])}{more}")
    return state


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {INDEX_FILE} is missing from {path}")
        return files
    single = path / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")


def original_name(name: str) -> str:
    """Map either naming scheme to the original one (`visual.*`, `model.*`, `lm_head.*`)."""
    for original, new in NAME_PREFIXES:
        if name.startswith(new):
            return original + name[len(new):]
    return name


def read_generation_config(path: Path, config: Qwen2VLConfig) -> GenerationDefaults:
    """Stop ids and sampling advice from generation_config.json; config.json's eos_token_id when the file is absent.
    Missing fields keep the library defaults of that file's format (no sampling, no penalty); ValueError for a
    field of the wrong type."""
    file = Path(path) / "generation_config.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    eos = data.get("eos_token_id", config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    defaults = GenerationDefaults(eos_token_id=eos, pad_token_id=data.get("pad_token_id"))
    for name, kind in (("do_sample", bool), ("temperature", float), ("top_p", float), ("top_k", int),
                       ("repetition_penalty", float), ("max_new_tokens", int)):
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float)) \
                or (kind is int and not float(value).is_integer()):
            raise ValueError(f"{file}: {name} must be a {kind.__name__}, got {value!r}")
        setattr(defaults, name, kind(value))
    return defaults


# ---- writing tiny random checkpoints ---------------------------------------------------------------------------

# Small enough for tests on two CPU cores; vocab exceeds 151656 so the real Qwen special ids are valid rows.
TINY_TEXT = dict(vocab_size=151680, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3], rope_theta=1e6, rms_norm_eps=1e-6)
# One vision head of 32: with 4 heads of 8 the tower's cost is mostly softmax over a frame's ~1,200 patches, more
# than decoding the video costs, and the ingest benchmark would time the tiny model instead of the pipeline.
TINY_VISION = dict(depth=2, embed_dim=32, num_heads=1, mlp_ratio=4.0)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tiny_config(tie_word_embeddings: bool = False, **overrides) -> Qwen2VLConfig:
    """Tiny Qwen2VLConfig. Overrides: TextConfig field names, `vision_config={...}` (VisionConfig fields), and
    top-level Qwen2VLConfig fields (token ids)."""
    text_kw = {**TINY_TEXT, "tie_word_embeddings": tie_word_embeddings}
    vision_kw = dict(TINY_VISION)
    top_kw = {}
    for key, value in overrides.items():
        if key == "vision_config":
            unknown = set(value) - set(VisionConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown vision_config fields {sorted(unknown)}")
            vision_kw.update(value)
        elif key in TextConfig.__dataclass_fields__:
            text_kw[key] = value
        elif key in Qwen2VLConfig.__dataclass_fields__ and key not in ("text", "vision"):
            top_kw[key] = value
        else:
            raise ValueError(f"unknown config override {key!r} (expected a TextConfig field, vision_config=, "
                             "or a Qwen2VLConfig token id field)")
    vision_kw.setdefault("hidden_size", text_kw["hidden_size"])    # merger output = LLM width
    return Qwen2VLConfig(vision=VisionConfig(**vision_kw), text=TextConfig(**text_kw), **top_kw)


def write_tiny_checkpoint(directory: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                          tie_word_embeddings: bool = False, shards: int = 1, naming: str = "original",
                          **config_overrides) -> Path:
    """Write a tiny random Qwen2-VL checkpoint in the HF layout with OUR model; returns the folder.

    Files: config.json, model.safetensors (or `shards` files + index), generation_config.json, tokenizer files,
    preprocessor_config.json. Weights are random with nonzero biases and non-unit norm weights.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    if naming not in ("original", "new"):
        raise ValueError(f"naming must be 'original' or 'new', got {naming!r}")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(tie_word_embeddings=tie_word_embeddings, **config_overrides)
    config.torch_dtype = _DTYPE_NAMES[dtype]

    _write_processing_files(directory)
    model = Qwen2VL(config)
    randomize_(model, seed)
    _silence_unknown_ids_(model, directory)
    state = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    if tie_word_embeddings:
        del state["lm_head.weight"]
    if naming == "new":
        state = {new_name(name): t for name, t in state.items()}
    _save_shards(state, directory, shards)

    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    pad = config.bos_token_id          # <|endoftext|>: Qwen's pad and second stop id (docs/model.md §9)
    stops = [i for i in ([config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id or [])]
    if pad is not None and pad not in stops:
        stops.append(pad)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": stops, "pad_token_id": pad, "do_sample": False}, indent=2))
    return directory


def _silence_unknown_ids_(model: torch.nn.Module, directory: Path) -> None:
    """Zero the output rows of ids the tiny tokenizer has no token for (most of the 151k-id space), so a random
    model's greedy answer is made of decodable tokens rather than an empty string."""
    from tokenizers import Tokenizer as _HFTokenizer

    known = torch.tensor(sorted(_HFTokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(True).values()))
    with torch.no_grad():
        weight = model.lm_head.weight                                   # (vocab, hidden); tied: embed_tokens too
        unknown = torch.ones(weight.shape[0], dtype=torch.bool)
        unknown[known[known < weight.shape[0]]] = False
        weight[unknown] = 0.0


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights that exercise every term: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norms 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                fan_in = param[0].numel()
                value = noise * (0.5 if "embed_tokens" in name else fan_in ** -0.5)
            elif name.endswith("bias"):
                value = noise * 0.1
            else:                                   # norm weights
                value = 1.0 + noise * 0.1
            param.copy_(value)


def new_name(name: str) -> str:
    """Original name -> the newer transformers scheme (`model.visual.*`, `model.language_model.*`)."""
    for original, new in NAME_PREFIXES:
        if name.startswith(original):
            return new + name[len(original):]
    return name


def _save_shards(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    names = list(state)
    if shards == 1:
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    total = sum(t.numel() * t.element_size() for t in state.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    filled, g = 0, 0
    for i, name in enumerate(names):
        # Move to the next shard once this one holds its share, leaving at least one tensor per remaining shard.
        if groups[g] and g < shards - 1 and (filled >= total * (g + 1) / shards or len(names) - i == shards - 1 - g):
            g += 1
        groups[g].append(name)
        filled += state[name].numel() * state[name].element_size()
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))


def _write_processing_files(directory: Path) -> None:
    # Lazy: the tokenizer/processor modules are only needed when writing a checkpoint.
    from .processor import write_preprocessor_config
    from .tokenizer import write_tiny_tokenizer
    write_tiny_tokenizer(directory)
    write_preprocessor_config(directory)
