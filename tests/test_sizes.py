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
    serving, gpus = out.output.split("\n\n")          # the memory table, then GPUs per decoder replica
    assert serving + "\n" in README.read_text() and gpus in README.read_text()
    assert "| Qwen2-VL-72B-Instruct | bf16 | 4 |" in gpus
    assert re.search(r"Qwen2-VL-7B-Instruct \| bf16 \| 15\.4 GiB", out.output)     # the tower included: images


def test_gpus_per_decoder_replica():
    """Weights take at most half of each GPU (qwen2vl/placement.py WEIGHT_SHARE): the 72B in bf16 on four 80 GiB
    GPUs, the 2B and 7B on one."""
    from qwen2vl.sizes import gpus_needed

    gib80 = 80 * 2**30
    assert [gpus_needed(released_config(s), torch.bfloat16, gib80) for s in ("2B", "7B", "72B")] == [1, 1, 4]
    assert gpus_needed(released_config("7B"), torch.float32, 40 * 2**30) == 2


def test_decoder_replica_reserves_decoder_gpus_only_when_the_cluster_has_gpus():
    from deploy.app import decoder_actor_options
    from pipeline.settings import Settings

    settings = Settings(decoder_gpus=4, decoder_cpus=1.0)
    assert decoder_actor_options(settings, 8.0) == {"num_cpus": 1.0, "num_gpus": 4}
    assert decoder_actor_options(settings, 0.0) == {"num_cpus": 1.0}
