"""The decoder's layers split over devices of one process (qwen2vl/placement.py): the plan, the forward and generate
through a split model, and loading each tensor onto its mapped device."""
import pytest
import torch

from qwen2vl.checkpoint import load_pretrained, tiny_config, write_tiny_checkpoint
from qwen2vl.placement import DeviceMap, Stage, part_bytes, place_, plan_devices
from qwen2vl.sizes import released_config

GPUS4 = [f"cuda:{i}" for i in range(4)]


@pytest.mark.parametrize("size", ["2B", "7B", "72B"])
def test_plan_is_contiguous_balanced_and_places_every_layer_once(size):
    config = released_config(size)
    plan = plan_devices(config, GPUS4, dtype=torch.bfloat16)
    n = config.text.num_hidden_layers
    assert [s.device for s in plan.stages] == [torch.device(d) for d in GPUS4]
    assert plan.stages[0].start == 0 and plan.stages[-1].end == n
    assert all(a.end == b.start for a, b in zip(plan.stages, plan.stages[1:]))
    assert len(plan.layers) == n
    assert plan.embed == torch.device("cuda:0") and plan.norm == torch.device("cuda:3")
    # a tied output layer is the embedding matrix: it stays with it
    assert plan.head == torch.device("cuda:0" if config.text.tie_word_embeddings else "cuda:3")
    # balanced: moving one layer at a boundary cannot lower the busiest device's weight bytes
    parts = part_bytes(config, torch.bfloat16)
    fixed = [parts.embed, 0, 0, parts.norm + parts.head]
    loads = [f + (s.end - s.start) * parts.layer for f, s in zip(fixed, plan.stages)]
    assert max(loads) - min(loads) <= max(parts.layer, parts.embed, parts.head)
    assert max(loads) <= (sum(loads) / 4) + parts.layer


def test_72b_middle_devices_hold_more_layers_than_the_ends():
    """The ends also hold the embeddings and the output layer (~1.2 GiB each in bf16), worth about one layer."""
    plan = plan_devices(released_config("72B"), GPUS4, dtype=torch.bfloat16)
    counts = [s.end - s.start for s in plan.stages]
    assert sum(counts) == 80 and counts[0] < counts[1] and counts[3] < counts[2]


def test_plan_refuses_more_devices_than_layers():
    with pytest.raises(ValueError, match="cannot split 2 decoder layers over 3 devices"):
        plan_devices(tiny_config(), ["cpu"] * 3, dtype=torch.float32)


def test_plan_refuses_a_model_that_does_not_fit():
    config = released_config("72B")
    with pytest.raises(ValueError, match=r"does not fit: cuda:\d would hold .* GiB .* each device may hold 40\.0 GiB"):
        plan_devices(config, GPUS4[:2], dtype=torch.bfloat16, memory_per_device=40 * 2**30)
    plan_devices(config, GPUS4, dtype=torch.bfloat16, memory_per_device=40 * 2**30)     # four of them do


def test_device_map_checks_its_stages():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="contiguous"):
        DeviceMap(embed=cpu, stages=(Stage(cpu, 0, 2), Stage(cpu, 3, 4)), norm=cpu, head=cpu)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("split"), seed=5, num_hidden_layers=4)


@pytest.fixture(scope="module")
def whole(checkpoint):
    return load_pretrained(checkpoint)


def test_split_model_equals_the_whole_one(checkpoint, whole):
    """Three stages, all on the CPU: the forward carries its tensors over at every stage start, and the split
    model's logits, KV cache and greedy tokens equal the unsplit model's bit for bit."""
    plan = plan_devices(tiny_config(num_hidden_layers=4), ["cpu"] * 3, dtype=torch.float32, visual="cpu")
    split = load_pretrained(checkpoint, device_map=plan)
    assert len(split.model.split_points) == 3
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [0, 0, 27, 18, 28, 18, 28, 45]])
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    a, b = whole(ids, attention_mask=mask, use_cache=True), split(ids, attention_mask=mask, use_cache=True)
    assert torch.equal(a.logits, b.logits)
    for i in range(4):
        assert torch.equal(a.past_key_values.layer(i)[0], b.past_key_values.layer(i)[0])
    greedy = dict(attention_mask=mask, max_new_tokens=12)
    assert torch.equal(whole.generate(ids, **greedy), split.generate(ids, **greedy))
    penalized = dict(attention_mask=mask, max_new_tokens=12, repetition_penalty=1.3)
    assert torch.equal(whole.generate(ids, **penalized), split.generate(ids, **penalized))


def test_place_moves_a_built_model_like_loading_onto_the_map(whole, checkpoint):
    plan = plan_devices(tiny_config(num_hidden_layers=4), ["cpu", "cpu"], dtype=torch.float32)
    moved = place_(load_pretrained(checkpoint), plan)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert moved.model.split_points == plan.split_points()
    assert torch.equal(whole(ids).logits, moved(ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_loading_puts_each_tensor_on_its_mapped_device(tmp_path, tied):
    """The meta device stands for a second GPU: what the map sends there takes no memory, and a tensor's device
    shows where the load put it."""
    folder = write_tiny_checkpoint(tmp_path, num_hidden_layers=4, tie_word_embeddings=tied)
    plan = plan_devices(tiny_config(num_hidden_layers=4, tie_word_embeddings=tied), ["cpu", "meta"],
                        dtype=torch.bfloat16, visual="meta")
    model = load_pretrained(folder, dtype=torch.bfloat16, device_map=plan)
    for name, tensor in model.state_dict().items():
        assert tensor.device == plan.device_of(name), name
        assert tensor.dtype == torch.bfloat16, name
    assert {model.model.layers[i].mlp.up_proj.weight.device.type for i in range(4)} == {"cpu", "meta"}
    assert model.model.norm.weight.device.type == "meta"
    assert model.lm_head.weight.device.type == ("cpu" if tied else "meta")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_a_map_without_a_tower_reads_no_tower(checkpoint):
    plan = plan_devices(tiny_config(num_hidden_layers=4), ["cpu", "cpu"], dtype=torch.float32)
    model = load_pretrained(checkpoint, device_map=plan)
    assert model.visual is None and plan.visual is None
    with pytest.raises(ValueError, match="places no vision tower"):
        plan.device_of("visual.merger.ln_q.weight")
