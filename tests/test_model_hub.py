"""Getting weights: `tubescope model pull` through the real huggingface_hub client from a hub mirror on loopback
(this machine cannot reach the hub), resumed after a dropped connection; `model_path` naming a repo id, resolved from
the local cache; what a checkpoint folder must hold."""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub_mirror import HubMirror
from pipeline.model_hub import CHECKPOINT_FILES, CheckpointMissing, check_checkpoint, hub_cache, is_repo_ref, parse_repo_ref
from pipeline.settings import Settings
from qwen2vl.checkpoint import load_pretrained, write_tiny_checkpoint
from qwen2vl.processor import Processor

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/Qwen2-VL-tiny"
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_tiny_checkpoint(root / REPO, shards=2)
    (root / REPO / "README.md").write_text("not a file the loader reads\n")
    mirror = HubMirror(root, cut_once={SHARD})
    yield mirror
    mirror.close()


def run_cli(args: list[str], data_dir: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TUBESCOPE_", "HF_"))}
    clean.update(TUBESCOPE_DATA_DIR=str(data_dir), HF_ENDPOINT=endpoint, HF_HOME=str(data_dir / "hf-home"),
                 HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=ROOT, env=clean, capture_output=True,
                          text=True, timeout=120)


def test_pull_resumes_checks_and_is_served_by_repo_id(mirror, tmp_path):
    data = tmp_path / "data"
    out = run_cli(["model", "pull", REPO], data, mirror.url)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.is_dir() and hub_cache(data.resolve()) in path.parents
    source = mirror.root / REPO
    for f in source.iterdir():                 # every file the loader reads, byte for byte; nothing else
        needed = any(fnmatch.fnmatch(f.name, pattern) for pattern in CHECKPOINT_FILES)
        assert (path / f.name).exists() == needed, f.name
        if needed:
            assert (path / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (path / "README.md").exists() and (path / SHARD).exists()
    gets = mirror.file_gets(SHARD)
    assert len(gets) == 2 and gets[0] is None and gets[1].startswith("bytes="), gets   # cut, then resumed
    assert "%" in out.stderr or "it/s" in out.stderr or "B/s" in out.stderr          # a progress bar was shown
    load_pretrained(path)
    Processor.from_pretrained(path)

    before = len(mirror.requests)              # a second pull finds everything in place: no file is fetched again
    again = run_cli(["model", "pull", REPO], data, mirror.url)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(path)
    assert not [r for r in mirror.requests[before:] if r[0] == "GET" and "/resolve/" in r[1]]

    # model_path names the repo id: resolved from the cache, no hub needed (the mirror is not asked)
    settings = Settings(data_dir=data, model_path=REPO)
    assert settings.model_path == REPO and settings.resolved_model_path() == path
    assert Settings(data_dir=data, model_path=f"{REPO}@main").resolved_model_path() == path
    shown = run_cli(["config"], data, "http://127.0.0.1:9", TUBESCOPE_MODEL_PATH=REPO)
    assert shown.returncode == 0 and str(path) in shown.stdout, shown.stderr


def test_repo_id_not_pulled_says_how_to_get_it_or_downloads_when_allowed(mirror, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", model_path=REPO)
    with pytest.raises(CheckpointMissing, match=f"tubescope model pull {REPO}"):
        settings.resolved_model_path()
    code = ("from pipeline.settings import Settings; "
            "print(Settings().resolved_model_path())")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TUBESCOPE_", "HF_"))}
    clean.update(TUBESCOPE_DATA_DIR=str(tmp_path / "data"), TUBESCOPE_MODEL_PATH=REPO, TUBESCOPE_MODEL_DOWNLOAD="1",
                 HF_ENDPOINT=mirror.url, HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    check_checkpoint(Path(out.stdout.strip()))


def test_pull_errors_are_clear(mirror, tmp_path):
    out = run_cli(["model", "pull", "nobody/nothing"], tmp_path / "data", mirror.url)
    assert out.returncode != 0 and "could not download nobody/nothing" in out.stderr
    out = run_cli(["model", "pull", "../etc"], tmp_path / "data", mirror.url)
    assert out.returncode != 0 and "not a hub repo id" in out.stderr


def test_check_checkpoint_names_what_is_missing(mirror, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(mirror.root / REPO, folder)
    check_checkpoint(folder)
    (folder / SHARD).write_bytes((folder / SHARD).read_bytes()[:100])          # truncated
    with pytest.raises(CheckpointMissing, match="cannot be read"):
        check_checkpoint(folder)
    (folder / SHARD).unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointMissing, match=f"lacks tokenizer.json, {SHARD}"):
        check_checkpoint(folder)


def test_repo_ids_and_folders_are_told_apart(tmp_path, monkeypatch):
    assert parse_repo_ref("Qwen/Qwen2-VL-7B-Instruct@v1.0") == ("Qwen/Qwen2-VL-7B-Instruct", "v1.0")
    for text in ("/abs/path", "a/b/c", "../x", "Qwen/..", "x"):
        assert parse_repo_ref(text) is None, text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_ref("org/name") and is_repo_ref("org/other")              # an existing folder wins
    assert Settings(model_path="org/name").model_path == tmp_path / "org" / "name"
