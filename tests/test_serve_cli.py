"""`tubescope serve` as a real process (its own Ray, embedded Redis, the Serve app, feed supervisor, live indexer),
driven by the real CLI commands `feeds`, `search` and `ask` over HTTP, then stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner, Result

from deploy.cli import cli
from deploy.client import TubescopeClient
from pipeline.redis_server import free_port
import sockets
from streams import free_tcp_port, wait_for
from videos import encode_video

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


class ServeProcess:
    """`python -m deploy serve` with its output collected line by line."""

    def __init__(self, env: dict[str, str], port: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy", "serve", "--port", str(port)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def line_with(self, words: str, timeout_s: float) -> str:
        def find():
            if self.proc.poll() is not None and not any(words in x for x in self.lines):
                raise AssertionError(f"serve exited {self.proc.returncode} before printing {words!r}:\n{self.output}")
            return next((x for x in self.lines if words in x), None)
        return wait_for(find, timeout_s, 0.1, f"{words!r} in the output of tubescope serve")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    videos = root / "videos"
    clip = encode_video(videos / "clip.mp4", 160, 90, 30, seconds=4.0).path
    live_clip = encode_video(videos / "live.mp4", 160, 90, 30, seconds=6.0).path
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TUBESCOPE_", "RAY_ADDRESS")) and k != "REDIS_URL"}
    env.update(TUBESCOPE_DATA_DIR=str(root / "data"), TUBESCOPE_FILE_ROOTS=json.dumps([str(videos)]),
               TUBESCOPE_SEGMENT_SECONDS="2", TUBESCOPE_MIN_PIXELS=str(4 * 784),
               TUBESCOPE_MAX_PIXELS=str(16 * 784), TUBESCOPE_DECODER_CPUS="0", TUBESCOPE_FEED_RECONCILE_SECONDS="0.5",
               TUBESCOPE_FEED_ALLOW_HOSTS='["127.0.0.1"]', RAY_USAGE_STATS_ENABLED="0")   # test feeds on loopback
    port = free_port()
    proc = ServeProcess(env, port)
    try:
        url_line = proc.line_with("tubescope API at ", 150)
        key_line = proc.line_with("admin API key", 10)
        yield {"proc": proc, "url": url_line.split("tubescope API at ")[1].split()[0],
               "key": key_line.rsplit(" ", 1)[1], "clip": clip, "live_clip": live_clip, "port": port}
    finally:
        proc.kill()


def run(server, *args: str, key: str | None = "<admin>") -> Result:
    env = {"TUBESCOPE_API_URL": server["url"]}
    if key is not None:
        env["TUBESCOPE_API_KEY"] = server["key"] if key == "<admin>" else key
    else:
        env["TUBESCOPE_API_KEY"] = ""
    return CliRunner().invoke(cli, list(args), env=env)


def test_serve_prints_url_and_a_generated_admin_key(server):
    assert server["url"] == f"http://127.0.0.1:{server['port']}"
    assert len(server["key"]) >= 32
    assert f"export TUBESCOPE_API_URL={server['url']} TUBESCOPE_API_KEY={server['key']}" in server["proc"].output
    assert "outputs are meaningless" in server["proc"].output          # the tiny model is named as such
    assert httpx.get(server["url"] + "/healthz").json()["status"] == "ok"
    # the generated key is required: the API does not run open
    assert httpx.get(server["url"] + "/v1/feeds").status_code == 401

    # the embedded Redis requires a password that the service uses and nothing prints (its URL is shown redacted)
    output = server["proc"].output
    shown = re.search(r"\[redis\] embedded server at redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", output)
    assert shown and not re.search(r"redis://[^/\s]*:(?!\*\*\*@)[^@\s/]+@", output), output
    import redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=int(shown.group(1))).get("tubescope:feeds")


def test_feeds_commands(server):
    refused = f"rtsp://127.0.0.1:{free_tcp_port()}/cam"
    r = run(server, "feeds", "add", refused, "--id", "door", "--name", "Door")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"added feed door (Door): {refused}"
    r = run(server, "feeds", "list")
    assert r.exit_code == 0 and r.stdout.splitlines() == [f"door\tDoor\t{refused}"]

    def reader_up():
        shown = run(server, "feeds", "show", "door")
        return shown.exit_code == 0 and json.loads(shown.stdout)["status"].get("state") == "running"
    wait_for(reader_up, 30, 0.3, "the supervisor in `tubescope serve` to start door's reader")

    r = run(server, "feeds", "add", "ftp://h/x.mp4")
    assert r.exit_code == 1 and "HTTP 422" in r.stderr and "scheme 'ftp'" in r.stderr
    r = run(server, "feeds", "list", key=None)
    assert r.exit_code == 1 and "HTTP 401: missing API key" in r.stderr
    r = run(server, "feeds", "rm", "door")
    assert r.exit_code == 0 and r.stdout.strip() == "removed feed door"
    r = run(server, "feeds", "rm", "door")
    assert r.exit_code == 1 and "HTTP 404" in r.stderr
    r = run(server, "feeds", "list")
    assert r.exit_code == 0 and r.stdout == "" and "no feeds registered" in r.stderr


def test_search_and_ask_commands_over_indexed_footage(server):
    with TubescopeClient(server["url"], server["key"]) as api:
        job = api.create_job([str(server["clip"])], source_id="clip")
        wait_for(lambda: api.get_job(job["id"])["state"] not in ("queued", "running"), 120, 0.5, "the job")
        assert api.get_job(job["id"])["state"] == "succeeded"

    r = run(server, "search", "a white box", "-s", "clip", "--limit", "2")
    assert r.exit_code == 0, r.output
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert sorted(row[3] for row in rows) == ["clip:0", "clip:2000"] and all(row[1] == "clip" for row in rows)

    r = run(server, "ask", "What moves?", "-s", "clip", "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert [e["segment_id"] for e in answer["evidence"]] == ["clip:0", "clip:2000"] and answer["stream_entry"]

    r = run(server, "ask", "What moves?", "-s", "clip", "--start", "0", "--end", "+0:02", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("answer: ")
    assert "evidence: clip 0:00 - 0:02 (clip:0, full)" in lines            # media time, as written; the tier
    assert any(line.startswith("plan: full: ") for line in lines)
    assert lines[-1].startswith("model: ") and "Redis stream tubescope:answers entry " in lines[-1]

    r = run(server, "summarize", "-s", "clip")                        # lines as they are made, then the summary
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("period clip 0:00 - 0:04: ") and "\nsummary of clip: " in r.stdout   # random text
    assert r.stdout.rstrip().endswith("Redis stream tubescope:summaries")

    r = run(server, "ask", "What moves?", "-s", "nope")
    assert r.exit_code == 1 and "HTTP 404" in r.stderr


def test_live_feed_is_indexed_by_the_live_indexer(server):
    """A local file registered as a feed: its reader samples it, the LiveIndexer encodes and indexes it, and the
    caption service captions what it indexed."""
    r = run(server, "feeds", "add", str(server["live_clip"]), "--id", "livecam")
    assert r.exit_code == 0, r.output
    with TubescopeClient(server["url"], server["key"]) as api:
        def indexed():
            return next((s for s in api.sources() if s["source_id"] == "livecam" and s["segments"] >= 1), None)
        wait_for(indexed, 90, 0.5, "a live segment of feed 'livecam' in the index")
        segs = api.segments("livecam")
        # live segments are stamped in epoch seconds, at most one segment (2 s) long
        assert segs and all(0 < s["t1"] - s["t0"] <= 2.0 + 1e-6 and abs(s["t0"] - time.time()) < 120 for s in segs)
        status = httpx.get(server["url"] + "/v1/status", headers={"Authorization": f"Bearer {server['key']}"}).json()
        assert status["live_indexer"]["running"] and status["live_indexer"]["segments"] >= 1
        # the caption service follows the index behind the live indexer: live segments get captions too
        wait_for(lambda: any(isinstance(s["caption"], str) for s in api.segments("livecam")) or None, 90, 0.5,
                 "a caption of a live segment")
        api.remove_feed("livecam")


# ---- the local Ray cluster is closed -------------------------------------------------------------------------------
SERVE_REPLICA = "ray::ServeRepli"         # a Serve replica's process name as /proc shows it (15 characters)
SERVE_REPLICA_RPC = "/ray.serve.ASGIService/HandleRequest"


def _proc_text(pid: int, name: str) -> list[str]:
    return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace").split("\0")


def _ray_process(server, name: str) -> int:
    return next(x.pid for x in sockets.listeners(server["proc"].proc.pid) if x.name == name)


def _arg(pid: int, flag: str) -> str:
    return next(a.split("=", 1)[1] for a in _proc_text(pid, "cmdline") if a.startswith(flag + "="))


def _token(server) -> str:
    """The run's Ray token, from the raylet's environment (readable by the same user only)."""
    environ = _proc_text(_ray_process(server, "raylet"), "environ")
    return next(v.split("=", 1)[1] for v in environ if v.startswith("RAY_AUTH_TOKEN="))


def _grpc_status(port: int, token: str | None):
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(SERVE_REPLICA_RPC)
        try:
            call(b"", metadata=[("authorization", f"Bearer {token}")] if token else None, timeout=20)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_the_local_ray_listens_on_loopback_only(server):
    """Every port of Ray (GCS, raylet, object manager, workers, agents, metrics) and Serve's proxy is on loopback but
    one per Serve replica: Ray Serve 2.60 binds each replica's inter-deployment gRPC server on every interface
    (a fixed "[::]:0"), and those refuse every call without this run's token."""
    import grpc

    found = sockets.listeners(server["proc"].proc.pid)
    assert {"gcs_server", "raylet"} <= {x.name for x in found}, [str(x) for x in found]   # Ray's own processes
    assert any(x.port == server["port"] and x.loopback_only for x in found)                # Serve's HTTP proxy
    open_ports = [x for x in found if not x.loopback_only]
    assert {x.name for x in open_ports} <= {SERVE_REPLICA}, [str(x) for x in open_ports]
    assert len({x.pid for x in open_ports}) == len(open_ports)                              # one per replica
    token = _token(server)
    for x in open_ports:
        assert _grpc_status(x.port, None) == grpc.StatusCode.UNAUTHENTICATED, str(x)
        assert _grpc_status(x.port, "x" * len(token)) == grpc.StatusCode.UNAUTHENTICATED, str(x)
    if open_ports:                             # the refusal is the token's doing: with it, the call gets through
        assert _grpc_status(open_ports[0].port, token) != grpc.StatusCode.UNAUTHENTICATED


GCS_READ = """
import sys
from ray._raylet import GcsClient
print(len(GcsClient(address=sys.argv[1]).internal_kv_keys(b"", b"serve", timeout=10)))
"""


def test_the_local_ray_refuses_a_client_without_this_runs_token(server, tmp_path):
    """What an attacker on the machine would try: read the GCS (Serve's stored app) without the token."""
    gcs = _arg(_ray_process(server, "raylet"), "--gcs-address")
    token = _token(server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)                             # no ~/.ray/auth_token to fall back on

    def read(extra: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", GCS_READ, gcs], env={**env, **extra}, capture_output=True,
                              text=True, timeout=90)

    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * len(token)}):
        refused = read(extra)
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, (refused.stdout, refused.stderr)
    allowed = read({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})    # the same read, with the token
    assert allowed.returncode == 0 and int(allowed.stdout) > 0, allowed.stderr
    # the token is this run's own: never printed, never written to Ray's logs
    assert len(token) >= 32 and token not in server["proc"].output
    log_dir = Path(_arg(_ray_process(server, "gcs_server"), "--log_dir"))
    assert not [f for f in log_dir.rglob("*") if f.is_file() and token.encode() in f.read_bytes()]


def test_sigterm_stops_serve_cleanly(server):
    proc = server["proc"]
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(60) == 0, proc.output
    proc._reader.join(5)
    assert proc.lines[-1] == "stopped", proc.output
    with pytest.raises(httpx.ConnectError):                   # the proxy is gone with it
        httpx.get(server["url"] + "/healthz", timeout=2)
    redis_url = proc.line_with("[redis] embedded server at ", 1).split(" at ")[1]
    import redis
    with pytest.raises(redis.ConnectionError):                # ...and so is the embedded Redis
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()


# ---- cluster deployment files --------------------------------------------------------------------------------------
def _check_deploys_the_app(config: dict, service: dict, monkeypatch) -> dict:
    """The checks every cluster config pair passes; returns the application's env vars."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deploy import app as app_module
    from deploy import http_deadlines
    from pipeline.settings import load_settings

    schema = ServeDeploySchema.model_validate(config)                  # what `serve deploy` validates
    [application] = schema.applications
    module, attr = application.import_path.split(":")
    assert module == "deploy.app" and callable(getattr(app_module, attr))
    assert {d.name for d in application.deployments} == {app_module.API, app_module.DECODER, app_module.FEEDS,
                                                        app_module.RETENTION, app_module.CAPTIONS}
    env_vars = application.runtime_env["env_vars"]
    # Serve stores this config in the cluster's GCS: no keys in it, and nothing that turns Ray's token auth off
    assert not {"TUBESCOPE_API_KEYS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_vars)
    for name, value in env_vars.items():                               # the settings it names are valid
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.redis_url and settings.index_dir
    [decoder] = [d for d in application.deployments if d.name == app_module.DECODER]
    assert decoder.ray_actor_options.num_gpus == settings.decoder_gpus     # what it reserves, it splits over

    assert service["kind"] == "RayService"
    service_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert service_config["applications"] == config["applications"]
    # every proxy (any node) inherits the controller's env, which arms the request-head deadline
    assert service_config["controller_options"] == config["controller_options"]
    proxy_env = schema.controller_options.runtime_env["env_vars"]
    monkeypatch.setenv(http_deadlines.TIMEOUT_ENV, proxy_env[http_deadlines.TIMEOUT_ENV])
    assert proxy_env[http_deadlines.PROXY_CALLBACK_ENV] == http_deadlines.CALLBACK
    assert http_deadlines.header_timeout_from_env() == load_settings().api_header_timeout_seconds
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    workers = cluster["workerGroupSpecs"]
    node_gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for w in workers
                 for c in w["template"]["spec"]["containers"]]
    assert max(node_gpus) >= settings.decoder_gpus                     # one node holds a whole replica
    # every Ray container (the app is built, and replicas run, on any node) reads the keys from a Secret
    for group in [cluster["headGroupSpec"], *workers]:
        for container in group["template"]["spec"]["containers"]:
            [keys] = [e for e in container["env"] if e["name"] == "TUBESCOPE_API_KEYS"]
            assert set(keys) == {"name", "valueFrom"} and keys["valueFrom"]["secretKeyRef"]["name"]
    return env_vars


def test_serve_yaml_and_rayservice_deploy_the_same_app(monkeypatch):
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    _check_deploys_the_app(config, service, monkeypatch)


@pytest.mark.parametrize("size", ["2B", "7B", "72B"])
def test_each_size_has_configs_that_deploy_the_same_app(size, monkeypatch, tmp_path):
    """deploy/sizes/<size>/ are what `tubescope model configs` makes from the base pair (so they cannot drift
    from it), name the size's checkpoint and dtype, and give a decoder replica the GPUs qwen2vl/sizes.py says it
    needs on 80 GiB GPUs (the 72B: 4, on one node)."""
    import yaml

    from qwen2vl.sizes import gpus_needed, released_config

    r = CliRunner().invoke(cli, ["model", "configs", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    folder = ROOT / "deploy" / "sizes" / size.lower()
    for name in ("serve.yaml", "rayservice.yaml"):
        assert (folder / name).read_text() == (tmp_path / size.lower() / name).read_text(), \
            f"deploy/sizes/{size.lower()}/{name} is stale: run `tubescope model configs`"
    config = yaml.safe_load((folder / "serve.yaml").read_text())
    service = yaml.safe_load((folder / "rayservice.yaml").read_text())
    env = _check_deploys_the_app(config, service, monkeypatch)
    assert env["TUBESCOPE_MODEL_PATH"].endswith(f"/Qwen2-VL-{size}-Instruct")
    assert env["TUBESCOPE_DECODER_DTYPE"] == "bfloat16"
    assert int(env["TUBESCOPE_DECODER_GPUS"]) == gpus_needed(released_config(size), torch.bfloat16, 80 * 2**30) \
        == (4 if size == "72B" else 1)


def test_serve_on_a_taken_port_fails_fast(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        r = CliRunner().invoke(cli, ["serve", "--port", str(port)], env={"TUBESCOPE_DATA_DIR": str(tmp_path)})
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert time.monotonic() - t0 < 5 and not (tmp_path / "redis").exists()     # nothing was started
