"""Identity of a model checkpoint: what the index stores as `model_id` beside every segment's tokens."""
from __future__ import annotations

import hashlib
from pathlib import Path


def model_id(path: str | Path) -> str:
    """`<folder name>@<12 hex>`: a hash of config.json and of each weight file's name, size and first/last MiB.

    Reading whole multi-GB weight files on every start would be slow; any re-save or fine-tune changes the size or the
    bytes at either end (the safetensors header sits at the start), so this is a practical fingerprint.
    """
    root = Path(path)
    h = hashlib.sha256()
    h.update((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return f"{root.resolve().name}@{h.hexdigest()[:12]}"


def pixel_norm(path: str | Path) -> tuple[list[float], list[float]]:
    """The checkpoint's per-channel image mean and std, read and checked by the model's own processor config."""
    from qwen2vl.processor import ProcessorConfig

    config = ProcessorConfig.from_pretrained(path)
    return list(config.image_mean), list(config.image_std)
