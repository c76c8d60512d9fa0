"""The sizes of the released checkpoints and the README's sizing table, computed from our model on the meta device."""
import re
from pathlib import Path

import torch
from click.testing import CliRunner

from deploy.cli import cli
from qwen2vl.sizes import kv_bytes_per_token, parameter_counts, released_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_parameter_counts_match_the_released_checkpoints():
    """docs/model.md §5: towers of 665 M, 676 M, 699 M; the 2B totals 2,208,985,600 parameters (its bf16
    safetensors hold exactly twice that many bytes of tensors)."""
    counts = {size: parameter_counts(released_config(size)) for size in ("2B", "7B", "72B")}
    assert [round(c["vision"] / 1e6) for c in counts.values()] == [665, 676, 699]
    assert sum(counts["2B"].values()) == 2_208_985_600
    assert round(sum(counts["7B"].values()) / 1e9, 2) == 8.29 and round(sum(counts["72B"].values()) / 1e9, 1) == 73.4
    # 7B: 28 layers x 4 KV heads x 128 dims x (K and V) x 2 bytes
    assert kv_bytes_per_token(released_config("7B"), torch.bfloat16) == 28 * 4 * 128 * 2 * 2


def test_readme_sizing_table_is_the_computed_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TUBESCOPE_DATA_DIR", str(tmp_path))
    out = CliRunner().invoke(cli, ["model", "sizes"])
    assert out.exit_code == 0, out.output
    assert out.output in README.read_text()
    assert re.search(r"Qwen2-VL-7B-Instruct \| bf16 \| 14\.2 GiB", out.output)
