"""Qwen2 byte-level BPE tokenizer over a checkpoint's tokenizer.json (the `tokenizers` library).

Special token ids are read from the files (tokenizer.json added tokens, tokenizer_config.json), never assumed.
`write_tiny_tokenizer` builds a small real tokenizer in the checkpoint layout for tests and the demo model: a BPE
vocabulary of about a thousand tokens trained on a built-in English text, plus the Qwen special tokens at their
real ids 151643..151656 (docs/model.md §9), so prompts built against it carry the same ids as the released models.
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qwen2vl.chat import CHAT_TEMPLATE

# The Qwen special tokens in id order from FIRST_SPECIAL_ID (docs/model.md §9). Used only to WRITE a tokenizer;
# reading always goes through the files.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
FIRST_SPECIAL_ID = 151643

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """tokenizer.json + tokenizer_config.json; pads on the left like the released Qwen2-VL tokenizers."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None, chat_template: str | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.padding_side = self.config.get("padding_side", "left")
        self.model_max_length = int(self.config.get("model_max_length", 32768))
        self.chat_template = chat_template if chat_template is not None else _template_from_config(self.config)
        # Special tokens by short name: "<|image_pad|>" -> "image_pad".
        self.special_ids: dict[str, int] = {}
        for token_id, added in sorted(backend.get_added_tokens_decoder().items()):
            content = added.content
            if added.special and content.startswith("<|") and content.endswith("|>"):
                self.special_ids[content[2:-2]] = token_id
        self.eos_token = _token_content(self.config.get("eos_token")) or "<|endoftext|>"
        self.pad_token = _token_content(self.config.get("pad_token")) or "<|endoftext|>"
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tokenizer_json = path / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise ValueError(f"no tokenizer.json in {path} (expected a Hugging Face checkpoint folder)")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"    # where transformers >= 4.5x saves it
        template = template_file.read_text() if template_file.is_file() else None
        return cls(backend, config, template)

    # ---- ids <-> text ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        # Qwen2 adds no BOS/EOS; special tokens written in the text are matched as single ids.
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"encode_batch expects a list of str, got an item of type {type(text).__name__}")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in this tokenizer's vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"id {token_id} is not in this tokenizer's vocabulary")
        return token

    def special_id(self, name: str) -> int:
        """Id of a special token by short name, e.g. special_id("image_pad")."""
        if name not in self.special_ids:
            raise ValueError(f"no special token <|{name}|> in this tokenizer; it has {sorted(self.special_ids)}")
        return self.special_ids[name]

    @property
    def image_pad_id(self) -> int:
        return self.special_id("image_pad")

    @property
    def video_pad_id(self) -> int:
        return self.special_id("video_pad")

    @property
    def vision_start_id(self) -> int:
        return self.special_id("vision_start")

    @property
    def vision_end_id(self) -> int:
        return self.special_id("vision_end")

    @property
    def im_start_id(self) -> int:
        return self.special_id("im_start")

    @property
    def im_end_id(self) -> int:
        return self.special_id("im_end")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def _token_content(token) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _template_from_config(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):     # named templates: [{"name": "default", "template": ...}, ...]
        by_name = {t.get("name"): t.get("template") for t in template}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    return template


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


# ---- a tiny real tokenizer in the checkpoint layout -------------------------------------------------------------

# Our own English text: enough byte pairs to learn about a thousand merges of everyday words.
TINY_CORPUS = """\
The camera on the north gate records the road all day and all night. A delivery van stops at the gate at nine in
the morning, the driver walks to the office with a box, and the van leaves ten minutes later. In the afternoon a
red bicycle leans against the fence while its rider reads a map. At dusk the street lights turn on one by one.
You are a helpful assistant. Describe this video. Describe this image. What happens in the first minute?
When did the truck arrive? How many people crossed the parking lot between noon and two o'clock? Is the door open?
The answer should cite the time of each event, for example 14:05 or 09:30, and say which camera saw it.
Video analytics turns hours of footage into a short list of moments that matter: a person entering a room, a car
parking in the wrong place, smoke near a machine, a package left on the steps. Each frame is split into small
square patches, and pairs of frames become tubes that carry motion as well as appearance. The vision encoder reads
the patches, the language model reads the question, and together they write an answer in plain words.
Operators point the system at live cameras and at archives of old recordings. Every source is sampled twice per
second. The index keeps the visual tokens of every segment so that later questions do not decode the video again.
A question can cover a few seconds or several days; the search step picks the segments worth looking at, and the
answer lists the timestamps it used. If the network drops, the reader waits, tries again, and counts what it lost.
The warehouse has three loading docks. Forklifts move pallets from the trucks to the shelves, and workers in yellow
vests check the labels. The cat sleeps on the windowsill in the sun. Children play football in the park after
school while their parents talk on the bench. The weather is cloudy with light rain in the evening, and the wind
comes from the west. The train to the city leaves at seven, and the next one comes twenty minutes later.
Numbers and symbols appear too: 0 1 2 3 4 5 6 7 8 9, 10, 25, 100, 2024, 3.5 seconds, 50% of frames, #7, (left),
[right], {top}, <bottom>, "quoted", 'single', a-b, a_b, a/b, a+b=c, x*y, 1920x1080, 30 fps, 2 fps, user@example.
She said: "The lights were off when I left." He asked, 'Where is the key?' They didn't see anything unusual.
It's late; we're tired, and they'll come back tomorrow. I'm sure you've seen this before, haven't you?
Tab\tseparated\tvalues and a second line
and a third line with trailing spaces   
Question: what color is the car near the entrance? Answer: the car near the entrance is blue.
Question: how many birds are on the wire? Answer: there are four birds on the wire.
Question: does anyone fall? Answer: no, everyone walks normally through the hall.
"""


def write_tiny_tokenizer(directory: str | Path, vocab_size: int = 1000) -> Path:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json of a tiny Qwen2-style tokenizer.

    The BPE part is trained here (about `vocab_size` tokens, ids 0..); the 14 Qwen special tokens sit at their real
    ids 151643..151656. transformers loads the folder as Qwen2TokenizerFast with the same ids.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 byte tokens plus merges), got {vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    trained = tokenizers.Tokenizer(models.BPE())
    trained.normalizer = normalizers.NFC()
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    trained.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trained.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    trained.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)

    # Place the special tokens at their real ids: they go into the BPE vocabulary itself (a gap in the id space
    # is allowed there), and are also declared as added tokens so the text splitter matches them whole.
    spec = json.loads(trained.to_str())
    vocab = spec["model"]["vocab"]
    if max(vocab.values()) >= FIRST_SPECIAL_ID:
        raise ValueError(f"trained vocabulary reaches id {max(vocab.values())}, above the special ids")
    added_tokens = []
    for offset, content in enumerate(QWEN_SPECIAL_TOKENS):
        token_id = FIRST_SPECIAL_ID + offset
        vocab[content] = token_id
        added_tokens.append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True})
    spec["added_tokens"] = added_tokens
    spec["model"]["byte_fallback"] = False
    text = json.dumps(spec, ensure_ascii=False)

    check = tokenizers.Tokenizer.from_str(text)
    for offset, content in enumerate(QWEN_SPECIAL_TOKENS):
        if check.token_to_id(content) != FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"{content} did not land on id {FIRST_SPECIAL_ID + offset}")
    (directory / "tokenizer.json").write_text(text)
    # vocab.json/merges.txt let transformers' slow Qwen2Tokenizer load the same vocabulary.
    bpe_only = {k: v for k, v in vocab.items() if k not in QWEN_SPECIAL_TOKENS}
    (directory / "vocab.json").write_text(json.dumps(bpe_only, ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens},
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "padding_side": "left",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return directory
