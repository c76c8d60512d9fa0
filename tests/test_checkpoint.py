"""Checkpoint loading (names, shards, ties, dtypes, errors) and the tiny random checkpoint writer."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2vl
from qwen2vl.checkpoint import tiny_config
from tests.reference import build_prompt, load_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=5)


def _state(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def test_tiny_checkpoint_layout_and_weights(tiny):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "preprocessor_config.json"):
        assert (tiny / name).is_file(), name
    model = qwen2vl.load_pretrained(tiny)
    cfg = model.config
    assert cfg.text.vocab_size > 151656 and cfg.text.hidden_size == 64 and cfg.vision.depth == 2
    assert model.generation_config.eos_token_id == [cfg.eos_token_id, cfg.bos_token_id]
    state = _state(model)
    assert all(state[k].abs().max() > 0 for k in state if k.endswith("bias"))
    assert all(not torch.allclose(state[k], torch.ones_like(state[k]))
               for k in state if k.endswith("norm.weight") or "layernorm" in k)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@torch.no_grad()
def test_tiny_checkpoint_is_read_by_the_reference(tiny):
    # Our writer's layout is a real HF checkpoint: transformers loads it and computes the same logits.
    ref, ours = load_reference(tiny), qwen2vl.load_pretrained(tiny)
    inputs = build_prompt([("text", 3), ("video", (2, 4, 4)), ("text", 4)], seed=9)
    assert (ours(**inputs).logits - ref(**inputs).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", [dict(shards=3), dict(naming="new"), dict(shards=2, naming="new"),
                                     dict(dtype=torch.bfloat16), dict(dtype=torch.float16, shards=2)])
def test_shards_names_and_dtypes_load_the_same_weights(tiny, tmp_path, variant):
    folder = qwen2vl.write_tiny_checkpoint(tmp_path / "v", seed=5, **variant)
    if variant.get("shards", 1) > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == variant["shards"]
        assert not (folder / "model.safetensors").exists()
    if variant.get("naming") == "new":
        names = {k for f in folder.glob("*.safetensors") for k in load_file(str(f))}
        assert any(k.startswith("model.language_model.") for k in names)
        assert any(k.startswith("model.visual.") for k in names)
    dtype = variant.get("dtype", torch.float32)
    expected = {k: v.to(dtype).float() for k, v in _state(qwen2vl.load_pretrained(tiny)).items()}
    got = _state(qwen2vl.load_pretrained(folder))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_load_in_bf16(tiny):
    model = qwen2vl.load_pretrained(tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(**build_prompt([("text", 2), ("image", (1, 4, 4)), ("text", 2)], seed=1))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_tied_embeddings(tmp_path):
    folder = qwen2vl.write_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    model = qwen2vl.load_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_overrides():
    cfg = tiny_config(num_attention_heads=2, mrope_section=[4, 6, 6], vision_config={"depth": 1})
    assert cfg.text.head_dim == 32 and cfg.vision.depth == 1
    with pytest.raises(ValueError, match="unknown config override"):
        tiny_config(not_a_field=1)


# ---- errors --------------------------------------------------------------------------------------------------

def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_files(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        qwen2vl.load_pretrained(tmp_path / "nowhere")
    no_config = _copy(tiny, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen2vl.load_pretrained(no_config)
    no_weights = _copy(tiny, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        qwen2vl.load_pretrained(no_weights)
    sharded = qwen2vl.write_tiny_checkpoint(tmp_path / "c", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        qwen2vl.load_pretrained(sharded)


def test_wrong_architecture(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a Qwen2-VL checkpoint"):
        qwen2vl.load_pretrained(folder)


@pytest.mark.parametrize("edit, message", [
    ("shape", r"shape mismatch for model.norm.weight.*\(65,\)"),
    ("missing", "missing tensors: model.layers.1.mlp.up_proj.weight"),
    ("unexpected", "unexpected tensor model.extra.weight"),
])
def test_bad_tensors(tiny, tmp_path, edit, message):
    folder = _copy(tiny, tmp_path / edit)
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    if edit == "shape":
        tensors["model.norm.weight"] = torch.ones(65)
    elif edit == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    else:
        tensors["model.extra.weight"] = torch.ones(3)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=message):
        qwen2vl.load_pretrained(folder)


@pytest.mark.parametrize("naming,shards", [("original", 1), ("new", 2)])
def test_load_vision_reads_only_the_tower_and_equals_the_full_model(tmp_path, naming, shards):
    path = qwen2vl.write_tiny_checkpoint(tmp_path / "ckpt", naming=naming, shards=shards)
    full = qwen2vl.load_pretrained(path)
    tower = qwen2vl.load_vision(path)
    assert tower.cfg == full.config.vision
    assert tower.state_dict().keys() == full.visual.state_dict().keys()
    grid = torch.tensor([[2, 4, 6], [1, 8, 4]])
    rows = torch.randn(int(grid.prod(1).sum()), full.config.vision.patch_dim)
    assert torch.equal(tower(rows, grid), full.visual(rows, grid))
