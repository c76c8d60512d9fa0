"""Answer text as it is decoded: token ids -> the clean text pieces handed to on_token (docs/architecture.md,
"Boxes": grounding markup never reaches the text)."""
from __future__ import annotations

import time
from typing import Callable

from qwen2vl.grounding import MARKERS as GROUNDING_MARKERS, Grounded, parse_grounding


class TextStream:
    """Token ids -> text pieces for on_token: decodes the whole answer so far and hands out what is new, holding
    back an incomplete UTF-8 character (shown as U+FFFD) until its next byte arrives. Stop ids end the text.

    The grounding tokens survive decoding as their markup (every other special token is skipped) and the pieces are
    the clean text of qwen2vl.grounding: a reference shows its label, a box nothing, and whatever follows an open
    box waits until it closes; so the pieces add up to the final answer exactly."""

    def __init__(self, tokenizer, on_token: Callable[[str], None] | None, stop_ids):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.stop_ids = set(stop_ids or [])
        specials = getattr(tokenizer, "special_ids", {})
        self.markers = {specials[m[2:-2]]: m for m in GROUNDING_MARKERS if m[2:-2] in specials}
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.first_token_at: float | None = None

    def put(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stopped or token in self.stop_ids:
            self.stopped = True
            return
        self.ids.append(token)
        text = parse_grounding(self.raw, final=False).text
        if not text.endswith("\ufffd"):
            self._send(text)

    def finish(self) -> None:
        self._send(self.text)

    @property
    def raw(self) -> str:
        """The answer so far with grounding markup and no other special token."""
        parts, run = [], []
        for token in self.ids:
            marker = self.markers.get(token)
            if marker is None:
                run.append(token)
                continue
            parts += [self.tokenizer.decode(run, skip_special_tokens=True), marker]
            run = []
        parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def grounded(self) -> Grounded:
        return parse_grounding(self.raw)

    @property
    def text(self) -> str:
        return self.grounded().text

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            if self.on_token is not None:
                self.on_token(piece)
