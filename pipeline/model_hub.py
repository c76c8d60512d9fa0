"""Checkpoints from the Hugging Face hub: `tubescope model pull`, and `model_path` naming a repo id.

Downloads go through the `huggingface_hub` client into `<data_dir>/models/hub` (the hub's own cache layout:
resumable partial files, one blob per content, snapshots per commit), only the files the loader reads
(`CHECKPOINT_FILES`). A repo id in `model_path` ("Qwen/Qwen2-VL-2B-Instruct", "...@REVISION") is resolved from that
cache; it is downloaded at that moment only when `model_download` allows it, so a service never reaches out on its
own unless told to. `check_checkpoint` says what a folder lacks before anything is loaded (docs/model.md,
"Checkpoint files").
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from safetensors import safe_open

CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "*.safetensors",
                    "model.safetensors.index.json")
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
PULL_ATTEMPTS = 4
log = logging.getLogger(__name__)
# an owner and a name (the hub's characters), an optional @revision (a branch, a tag or a commit)
_REPO_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w./-]{1,128}))?")


class CheckpointMissing(FileNotFoundError):
    """A repo id that is not in the local cache (and may not be downloaded now), or a folder lacking files."""


def parse_repo_ref(text: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `text` is written like a hub repo id; None for anything else."""
    m = _REPO_REF.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or ".." in m["repo"] or (m["revision"] and ".." in m["revision"]):
        return None
    return m["repo"], m["revision"]


def is_repo_ref(text: str) -> bool:
    """A repo id, not a folder: written like one, and no such folder exists here (a relative path `org/name` that
    exists is taken as the folder)."""
    return parse_repo_ref(text) is not None and not Path(text).expanduser().exists()


def hub_cache(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / "hub"


def pull(ref: str, cache_dir: Path, *, revision: str | None = None, progress: bool = True,
         attempts: int = PULL_ATTEMPTS) -> Path:
    """Download (or finish downloading) the checkpoint files of `ref` into `cache_dir`; return its snapshot folder,
    checked. A connection dropped in the middle of a file is tried again (`attempts` in all), each time from where
    the partial file ends (the client keeps it and asks for the rest with a Range), so does a later pull; a progress
    bar per file when `progress`."""
    import requests
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    repo_id, ref_revision = _parse(ref)
    (disable_progress_bars if not progress else enable_progress_bars)()
    for attempt in range(1, attempts + 1):
        try:
            path = Path(snapshot_download(repo_id, revision=revision or ref_revision, cache_dir=str(cache_dir),
                                          allow_patterns=list(CHECKPOINT_FILES)))
            break
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as e:
            if attempt == attempts:
                raise
            log.warning("download of %s interrupted (%s); resuming (attempt %d of %d)", ref, e, attempt + 1, attempts)
    check_checkpoint(path)
    return path


def resolve(ref: str, cache_dir: Path, *, download: bool = False) -> Path:
    """The local snapshot folder of `ref` from `cache_dir`; downloaded first when it is not there and `download`;
    CheckpointMissing otherwise (naming the command that fetches it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision = _parse(ref)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir), local_files_only=True,
                                      allow_patterns=list(CHECKPOINT_FILES)))
    except LocalEntryNotFoundError:
        if not download:
            raise CheckpointMissing(
                f"checkpoint {ref!r} is not in the local hub cache {cache_dir}; fetch it with `tubescope model pull "
                f"{ref}` (or set model_download = true to let the service download it)") from None
        return pull(ref, cache_dir, progress=False)
    check_checkpoint(path)
    return path


def check_checkpoint(path: Path) -> None:
    """CheckpointMissing naming what the loader needs and `path` lacks: config, tokenizer files, every weight file
    (one file, or each shard the index names), each with a readable safetensors header."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointMissing(f"{index} is not a safetensors index: {e}") from None
    else:
        shards = ["model.safetensors"]
    missing += [s for s in shards if not (path / s).is_file()]
    if missing:
        raise CheckpointMissing(f"checkpoint folder {path} lacks {', '.join(missing)}")
    for shard in shards:
        try:
            with safe_open(str(path / shard), framework="numpy") as f:
                f.keys()
        except Exception as e:          # a truncated or foreign file: safetensors raises its own error types
            raise CheckpointMissing(f"weight file {path / shard} cannot be read: {e}") from None


def _parse(ref: str) -> tuple[str, str | None]:
    parsed = parse_repo_ref(ref)
    if parsed is None:
        raise ValueError(f"{ref!r} is not a hub repo id (OWNER/NAME or OWNER/NAME@REVISION)")
    return parsed


__all__ = ["CHECKPOINT_FILES", "CheckpointMissing", "check_checkpoint", "hub_cache", "is_repo_ref",
           "parse_repo_ref", "pull", "resolve"]
