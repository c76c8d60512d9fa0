"""Tokenizer and chat template against the real transformers 4.57.6 reference over the same files."""
import json

import pytest
from transformers import AutoTokenizer, Qwen2Tokenizer

from qwen2vl.chat import render_chat
from qwen2vl.tokenizer import Tokenizer, write_tiny_tokenizer

REAL_SPECIAL_IDS = {  # the released models' ids (docs/model.md §9)
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
    "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}

TEXTS = [
    "Hello world",
    " Hello world",
    "The camera on the north gate records the road.",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What's here?<|im_end|>\n",
    "Numbers 1920x1080 at 30 fps, 12:05:59, 3.14159 and 2024-11-26.",
    "Unicode: café, naïve, Straße, 東京, emoji 🎥📹, tabs\tand\r\nnewlines\n\n\n   spaces   ",
    "they'll it's WE'RE I'M you've he'd",
    "<|endoftext|><|box_start|>(1,2),(3,4)<|box_end|><|object_ref_start|>car<|object_ref_end|>",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def ref(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_reference_loads_it_as_qwen2_fast(ref):
    assert type(ref).__name__ == "Qwen2TokenizerFast"
    assert ref.padding_side == "left"
    assert ref.model_max_length == 32768
    assert ref.pad_token == "<|endoftext|>" and ref.eos_token == "<|im_end|>"
    assert ref.bos_token is None


def test_special_tokens_sit_at_real_ids(ours, ref):
    for content, token_id in REAL_SPECIAL_IDS.items():
        assert ours.token_to_id(content) == token_id
        assert ref.convert_tokens_to_ids(content) == token_id
        assert ours.special_id(content[2:-2]) == token_id
    assert ours.pad_token_id == ref.pad_token_id == 151643
    assert ours.eos_token_id == ref.eos_token_id == 151645
    assert (ours.image_pad_id, ours.video_pad_id, ours.vision_start_id, ours.vision_end_id) == (151655, 151656, 151652, 151653)
    assert (ours.im_start_id, ours.im_end_id) == (151644, 151645)
    assert ours.padding_side == "left" and ours.model_max_length == 32768


def test_vocabulary_is_small_and_trained(ours):
    normal_ids = [i for t, i in ours.backend.get_vocab().items() if t not in REAL_SPECIAL_IDS]
    assert 600 <= len(normal_ids) <= 1000 and max(normal_ids) < 1000
    # Merges were learned: frequent corpus words are single tokens, byte fallback pieces are not needed.
    for word in ("Ġthe", "Ġcamera", "Ġvideo"):
        assert ours.backend.token_to_id(word) is not None, word
    assert len(ours.encode(" the camera")) == 2


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_reference(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"]
    assert ids == ref.encode(text, add_special_tokens=True)
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(ours):
    ids = ours.encode("a<|image_pad|><|image_pad|>b<|video_pad|>")
    assert ids.count(151655) == 2 and ids.count(151656) == 1


def test_batch_encode_and_decode(ours, ref):
    assert ours.encode_batch(TEXTS) == [ref(t)["input_ids"] for t in TEXTS]
    ids = [ours.encode(t) for t in TEXTS[:3]]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)


def test_slow_reference_reads_vocab_and_merges(tok_dir, ours):
    slow = Qwen2Tokenizer.from_pretrained(tok_dir)
    for text in TEXTS[:4]:
        assert slow(text)["input_ids"] == ours.encode(text)


def test_bad_input(tok_dir, ours, tmp_path):
    with pytest.raises(ValueError, match="not in this tokenizer"):
        ours.token_to_id("<|no_such_token|>")
    with pytest.raises(ValueError, match="no special token"):
        ours.special_id("no_such")
    with pytest.raises(ValueError, match="expects a str"):
        ours.encode(123)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_tokenizer(tmp_path / "x", vocab_size=10)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        v: k for k, v in REAL_SPECIAL_IDS.items()}


# ---- chat template: our Python rules == our Jinja template rendered by transformers -------------------------------

CONVERSATIONS = {
    "text": [{"role": "user", "content": "What happened at the gate?"}],
    "image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    "video": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe this video."}]}],
    "system_and_turns": [
        {"role": "system", "content": "You watch cameras."},
        {"role": "user", "content": [{"type": "text", "text": "First: "}, {"type": "image", "image": "a.jpg"},
                                     {"type": "video", "video": "b.mp4"}, {"type": "image"}]},
        {"role": "assistant", "content": "A truck arrives."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And now?"}]},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_chat_template_matches_reference(ours, ref, name, add_generation_prompt, add_vision_id):
    messages = CONVERSATIONS[name]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       add_vision_id=add_vision_id)
    assert render_chat(messages, add_generation_prompt, add_vision_id) == expected
    assert ours.chat_template == ref.chat_template


def test_chat_template_spec_example():
    # docs/model.md §9: a user turn with one video then text, before expansion.
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|video_pad|><|vision_end|>Describe this video.<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(CONVERSATIONS["video"]) == expected
    with_ids = render_chat(CONVERSATIONS["system_and_turns"], add_vision_id=True)
    assert "First: Picture 1: <|vision_start|><|image_pad|><|vision_end|>Video 1: " in with_ids
    assert "Picture 2: " in with_ids and "Video 2: <|vision_start|><|video_pad|>" in with_ids
    assert not with_ids.startswith("<|im_start|>system\nYou are a helpful")


def test_chat_bad_messages():
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        render_chat([{"content": "hi"}])
    with pytest.raises(ValueError, match="not an image, video or text"):
        render_chat([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="content must be"):
        render_chat([{"role": "user", "content": 5}])
