"""Qwen2-VL chat format (docs/model.md §9): a Jinja template for checkpoint files and the same rules in Python.

The Jinja string is what `write_tiny_tokenizer` stores in tokenizer_config.json (transformers renders it); the
Python `render_chat` is what qwen2vl uses at run time (no Jinja dependency). Tests hold the two equal.
"""
from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

CHAT_TEMPLATE = (
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set seen.images = seen.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ seen.images ~ ': ' -}}{%- endif -%}"
    "{{- '" + IMAGE_PLACEHOLDER + "' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set seen.videos = seen.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ seen.videos ~ ': ' -}}{%- endif -%}"
    "{{- '" + VIDEO_PLACEHOLDER + "' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
    """Render HF-style messages ({"role", "content": str | list of {"type": "image"|"video"|"text", ...}}).

    Each image/video item becomes ONE pad token between vision start/end; the processor expands it later.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    parts: list[str] = []
    n_images = n_videos = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if index == 0 and role != "system":
            parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        parts.append(f"<|im_start|>{role}\n")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, (list, tuple)):
            for item in content:
                if not isinstance(item, dict):
                    raise ValueError(f"message {index}: content items must be dicts, got {item!r}")
                kind = item.get("type")
                # Same precedence as the template: image keys, then video keys, then text.
                if kind == "image" or "image" in item or "image_url" in item:
                    n_images += 1
                    parts.append((f"Picture {n_images}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
                elif kind == "video" or "video" in item:
                    n_videos += 1
                    parts.append((f"Video {n_videos}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
                elif "text" in item:
                    parts.append(str(item["text"]))
                else:
                    raise ValueError(f"message {index}: content item {item!r} is not an image, video or text "
                                     "(expected {'type': 'image'|'video'|'text', ...})")
        else:
            raise ValueError(f"message {index}: content must be a str or a list of items, got {type(content).__name__}")
        parts.append("<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
