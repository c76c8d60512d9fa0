"""The `tubescope` command line: help, stubs that say plainly what is missing, config, model init-tiny, demo.

The REST commands (serve, ask, search, feeds) are tested in tests/test_serve_cli.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.demo import DEMO_STREAM

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "index", "segments", "captions", "ask", "search", "summarize", "serve", "feeds", "model",
            "config", "clip")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUBESCOPE_") and k != "REDIS_URL"}
    env.update(TUBESCOPE_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


def test_help_lists_every_command_through_the_real_entry_point():
    out = subprocess.run([sys.executable, "-m", "deploy", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)


def test_console_script_points_at_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tubescope": "deploy.cli:main"}
    from deploy.cli import main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_config_prints_effective_settings_as_json(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("segment_seconds: 4\n")
    env = _env(tmp_path, REDIS_URL="redis://:secret@127.0.0.1:7777/0", TUBESCOPE_FPS="1")
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config"], env=env)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["data_dir"] == str(tmp_path / "data")
    assert (d["fps"], d["segment_seconds"]) == (1.0, 4.0)
    assert d["redis_url"] == "redis://:***@127.0.0.1:7777/0"


def test_config_with_a_bad_value_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["config"], env=_env(tmp_path, TUBESCOPE_SEGMENT_SECONDS="7.5"))
    assert result.exit_code == 2
    assert "even whole number of frames" in result.stderr


def test_model_init_tiny(tmp_path):
    result = CliRunner().invoke(cli, ["model", "init-tiny", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert list((tmp_path / "tiny").glob("*.safetensors"))


@pytest.mark.timeout(240)
def test_demo_runs_the_mission_with_embedded_redis_and_exits_0(tmp_path):
    """`make demo` on a fresh machine: the embedded Redis (REDIS_URL unset), the tiny model, one archive job, a
    question with its evidence; the results outlive the demo in Redis's dump."""
    out = subprocess.run([sys.executable, "-m", "deploy", "demo"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(tmp_path), timeout=220)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "embedded redis-server started, listening on redis://:***@127.0.0.1:" in out.stdout
    assert not re.search(r"redis://:(?!\*\*\*@)", out.stdout + out.stderr)      # its password shown nowhere
    assert "outputs are meaningless" in out.stdout and "TUBESCOPE_MODEL_PATH" in out.stdout   # says so plainly
    assert "job succeeded: 1 segment(s) indexed" in out.stdout                               # 4 s clip, 8 s segments
    assert "evidence: source demo 0.0-4.0 s (demo:0)" in out.stdout
    assert "Serve and Ray shut down" in out.stdout and out.stdout.rstrip().endswith("demo done")
    dump = tmp_path / "data" / "redis" / "dump.rdb"
    assert dump.is_file()                                            # the results outlive the demo
    from pipeline.redis_server import RedisServer
    with RedisServer(dump.parent, persist=True) as server:
        client = server.client(decode_responses=True)
        [(summary_id, summary)] = client.xrange(DEMO_STREAM)
        [(answer_id, answer)] = client.xrange("tubescope:answers")
    assert Path(summary["clip"]).is_file() and summary["segments"] == "1" and "error" not in summary
    assert summary_id in out.stdout                                  # it printed where the summary went
    assert answer_id == summary["answer_entry"] and answer_id in out.stdout   # ...and the answer's entry
    assert summary["answer_id"] in json.dumps(answer)
