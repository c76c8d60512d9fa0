"""Settings: defaults, environment, settings files, precedence, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.settings import Settings, load_settings, settings_json
from pipeline.video.protocols import redact_url

ENV_VARS = ("TUBESCOPE_DATA_DIR", "TUBESCOPE_REDIS_URL", "REDIS_URL", "TUBESCOPE_CONFIG", "TUBESCOPE_FPS",
            "TUBESCOPE_SEGMENT_SECONDS", "TUBESCOPE_MODEL_PATH", "TUBESCOPE_MAX_PIXELS", "TUBESCOPE_MIN_PIXELS",
            "TUBESCOPE_API_KEYS", "TUBESCOPE_NUM_ENCODER_ACTORS", "TUBESCOPE_ENCODER_TOKEN_BUDGET")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)          # the default data dir is relative to the working directory


def test_defaults_follow_the_design(tmp_path):
    s = load_settings()
    assert s.data_dir == tmp_path / "tubescope-data"
    assert s.data_dir.is_absolute()
    assert s.redis_url is None
    assert s.model_path is None and s.uses_tiny_model
    assert s.resolved_model_path() == tmp_path / "tubescope-data" / "models" / "tiny-qwen2vl"
    assert s.index_root == tmp_path / "tubescope-data" / "index"
    assert (s.fps, s.segment_seconds, s.frames_per_segment, s.tubes_per_segment) == (2.0, 8.0, 16, 8)
    assert (s.min_pixels, s.max_pixels) == (128 * 28 * 28, 768 * 28 * 28)      # docs/model.md §3
    assert s.encoder_token_budget >= s.max_pixels // (14 * 14)
    assert s.encoder_cpus < 1                                                  # never starve read tasks


def test_environment_variables_with_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("TUBESCOPE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("TUBESCOPE_FPS", "1")
    monkeypatch.setenv("TUBESCOPE_SEGMENT_SECONDS", "4")
    monkeypatch.setenv("TUBESCOPE_MODEL_PATH", "~/ckpt")
    monkeypatch.setenv("TUBESCOPE_NUM_ENCODER_ACTORS", "3")
    monkeypatch.setenv("TUBESCOPE_API_KEYS", json.dumps([{"key": "k" * 20, "role": "reader", "sources": ["cam1"]}]))
    s = load_settings()
    assert s.data_dir == tmp_path / "d"
    assert (s.fps, s.segment_seconds, s.frames_per_segment) == (1.0, 4.0, 4)
    assert s.model_path == Path("~/ckpt").expanduser() and not s.uses_tiny_model
    assert s.resolved_model_path() == s.model_path
    assert s.num_encoder_actors == 3
    assert s.api_keys[0].role == "reader" and s.api_keys[0].sources == ["cam1"]


def test_redis_url_from_redis_url_or_prefixed(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:6379/0")
    assert load_settings().redis_url == "redis://10.0.0.1:6379/0"
    monkeypatch.setenv("TUBESCOPE_REDIS_URL", "redis://10.0.0.2:6379/1")    # the specific name wins
    assert load_settings().redis_url == "redis://10.0.0.2:6379/1"
    assert load_settings(redis_url="redis://10.0.0.3:1/0").redis_url == "redis://10.0.0.3:1/0"   # then arguments
    monkeypatch.delenv("TUBESCOPE_REDIS_URL")
    monkeypatch.setenv("REDIS_URL", "")                                      # empty means unset: embedded
    assert load_settings().redis_url is None


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'fps = 1.0\nsegment_seconds = 6\nmax_pixels = 200704\nredis_url = "redis://127.0.0.1:7000/0"\n'
              'feed_schemes = ["rtsp", "RTSPS"]\n'),
    (".yaml", "fps: 1.0\nsegment_seconds: 6\nmax_pixels: 200704\nredis_url: redis://127.0.0.1:7000/0\n"
              "feed_schemes: [rtsp, RTSPS]\n"),
    (".json", json.dumps({"fps": 1.0, "segment_seconds": 6, "max_pixels": 200704,
                          "redis_url": "redis://127.0.0.1:7000/0", "feed_schemes": ["rtsp", "RTSPS"]})),
])
def test_settings_file_formats(tmp_path, monkeypatch, suffix, text):
    path = tmp_path / f"tubescope{suffix}"
    path.write_text(text)
    for s in (load_settings(config_file=path), _via_env(monkeypatch, path)):
        assert (s.fps, s.segment_seconds, s.frames_per_segment) == (1.0, 6.0, 6)
        assert s.max_pixels == 200704
        assert s.redis_url == "redis://127.0.0.1:7000/0"
        assert s.feed_schemes == ["rtsp", "rtsps"]


def _via_env(monkeypatch, path: Path) -> Settings:
    monkeypatch.setenv("TUBESCOPE_CONFIG", str(path))
    return load_settings()


def test_precedence_arguments_over_env_over_file(tmp_path, monkeypatch):
    path = tmp_path / "s.toml"
    path.write_text("fps = 1.0\nnum_encoder_actors = 2\nencoder_token_budget = 9000\n")
    monkeypatch.setenv("TUBESCOPE_CONFIG", str(path))
    monkeypatch.setenv("TUBESCOPE_NUM_ENCODER_ACTORS", "5")
    s = load_settings(encoder_token_budget=20000)
    assert s.fps == 1.0                        # file over default
    assert s.num_encoder_actors == 5           # env over file
    assert s.encoder_token_budget == 20000     # argument over everything


@pytest.mark.parametrize("kwargs,words", [
    (dict(fps=3.0, segment_seconds=2.5), "even whole number of frames"),   # 7.5 frames
    (dict(fps=2.0, segment_seconds=7.5), "even whole number"),             # 15 frames: odd
    (dict(fps=0), "fps"),
    (dict(min_pixels=500_000, max_pixels=400_000), "max_pixels"),
    (dict(encoder_token_budget=1000), "encoder_token_budget"),
    (dict(redis_url="http://localhost:6379"), "redis_url"),
    (dict(encoder_dtype="float64"), "encoder_dtype"),
    (dict(fsp=2.0), "fsp"),                                          # a typo is an error, not ignored
    (dict(api_keys=[{"key": "short", "role": "admin"}]), "key"),
    (dict(api_keys=[{"key": "k" * 20, "role": "root"}]), "role"),
    (dict(feed_schemes=["rtsp", "rtmp"]), r"feed_schemes \['rtmp'\] are not ones a feed reader opens"),
])
def test_bad_values_raise_value_error_naming_the_problem(kwargs, words):
    with pytest.raises(ValueError, match=words):
        load_settings(**kwargs)


def test_bad_settings_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(config_file=tmp_path / "missing.toml")
    ini = tmp_path / "s.ini"
    ini.write_text("fps=2")
    with pytest.raises(ValueError, match="unknown format '.ini'"):
        load_settings(config_file=ini)
    typo = tmp_path / "typo.yaml"
    typo.write_text("fsp: 2\n")
    with pytest.raises(ValueError, match="fsp"):
        load_settings(config_file=typo)
    monkeypatch.setenv("TUBESCOPE_CONFIG", str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="nope.json"):
        load_settings()


def test_public_json_hides_secrets():
    s = load_settings(redis_url="redis://user:hunter2@db.example:6380/0",
                      api_keys=[{"key": "secretsecretsecret", "role": "admin"}])
    text = settings_json(s)
    assert "hunter2" not in text and "secretsecretsecret" not in text
    d = json.loads(text)
    assert d["redis_url"] == "redis://user:***@db.example:6380/0"
    assert d["fps"] == 2.0 and d["resolved_model_path"].endswith("tiny-qwen2vl")
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_index_dir_may_be_a_uri_or_a_local_path(tmp_path, monkeypatch):
    assert load_settings(index_dir="s3://bucket/index").index_root == "s3://bucket/index"
    assert load_settings(index_dir=str(tmp_path / "idx")).index_root == tmp_path / "idx"
    # a relative folder is fixed where the settings are read, not where each worker happens to run
    monkeypatch.chdir(tmp_path)
    s = load_settings(index_dir="rel/idx")
    monkeypatch.chdir("/")
    assert s.index_root == tmp_path / "rel" / "idx"


def test_settings_errors_never_print_secrets_back():
    for bad in ({"api_keys": [{"key": "short-s3cret", "role": "admin"}]}, {"redis_url": "http://u:s3cret@h:1/0"},
                {"api_keys": [{"key": "long-enough-s3cret-key", "role": "root"}]}):
        with pytest.raises(ValueError) as e:
            load_settings(**bad)
        assert "s3cret" not in str(e.value) and ("api_keys" in str(e.value) or "redis_url" in str(e.value))


def test_redaction_hides_passwords_and_credential_query_parameters():
    assert redact_url("rtsp://u:pw@cam:554/s?channel=1") == "rtsp://u:***@cam:554/s?channel=1"
    assert redact_url("https://cdn/live.m3u8?token=abc123&quality=hd") == "https://cdn/live.m3u8?token=***&quality=hd"
    url = "https://b.s3/x.mp4?X-Amz-Credential=AKIA&X-Amz-Signature=f00d&X-Amz-Expires=60"
    assert redact_url(url) == "https://b.s3/x.mp4?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    assert redact_url("rtsp://cam/s?user=admin&password=hunter2") == "rtsp://cam/s?user=admin&password=***"
    assert redact_url("udp://:5600?fifo_size=10") == "udp://:5600?fifo_size=10"      # nothing secret: unchanged
