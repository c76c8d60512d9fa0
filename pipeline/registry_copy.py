"""The feed registry's durable copy: `<index root>/_feeds.json`, so a Redis that restarts without persistence does not
silently unregister every feed (docs/architecture.md, "Live indexing").

Redis stays the fast path and the one place changes are made (pipeline/feeds.py); the feed supervisor calls
`RegistryCopy.sync(redis)` every round, which
- rewrites the copy (temp name, then rename) whenever the registry's version has changed, and
- when Redis has lost the registry (no version and no feeds, or a version below the copy's because feeds were added
  to a fresh server), puts the copy's feeds back (HSETNX: what Redis holds wins), raises the version past both, and
  says so loudly: an error log, a `feed_registry_restored` entry on tubescope:errors and
  tubescope_feed_registry_restores_total.
The copy lives beside the index because the index root is the storage that outlives processes and nodes (a shared
volume or bucket on a cluster). An index root that is missing is never created here.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from pipeline import metrics
from pipeline.feeds import FEEDS_KEY, VERSION_KEY, read_registry, registry_lost
from pipeline.index import SegmentIndex
from pipeline.index_files import TMP_PREFIX
from pipeline.redis_server import as_client

log = logging.getLogger(__name__)

COPY_NAME = "_feeds.json"


class RegistryUnknown(RuntimeError):
    """Redis has lost the registry and the copy cannot be read: which feeds exist is unknown."""


class RegistryCopy:
    """Load, save and restore the durable copy of the feed registry under an index root."""

    def __init__(self, index_root, filesystem=None):
        self.index = SegmentIndex(index_root, filesystem, create=False)
        self.path = f"{self.index.root}/{COPY_NAME}"
        self.version: int | None = None        # version of the copy on disk, once read or written
        self._read = False
        self._save_failed_for: int | None = None

    def load(self) -> tuple[int, list[dict]] | None:
        """(version, feeds) of the copy, or None when there is none; IndexUnavailable when the root is missing,
        ValueError when the file is not a registry copy."""
        self.index.check_root()
        try:
            with self.index.fs.open_input_stream(self.path) as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            return None
        if not isinstance(data, dict) or isinstance(data.get("version"), bool) \
                or not isinstance(data.get("version"), int) or not isinstance(data.get("feeds"), list) \
                or not all(isinstance(f, dict) and isinstance(f.get("id"), str) for f in data["feeds"]):
            raise ValueError(f"{self.path} is not a feed registry copy")
        return data["version"], data["feeds"]

    def save(self, version: int, feeds: list[dict]) -> None:
        """Write the copy atomically (a reader sees the old or the new one, never a part)."""
        self.index.check_root()
        tmp = f"{self.index.root}/{TMP_PREFIX}feeds-{uuid.uuid4().hex}"
        payload = json.dumps({"version": version, "saved": time.time(), "feeds": feeds}, indent=1).encode()
        try:
            with self.index.fs.open_output_stream(tmp) as out:
                out.write(payload)
            self.index.fs.move(tmp, self.path)
        except BaseException:
            try:
                self.index.fs.delete_file(tmp)
            except OSError:
                pass
            raise
        self.version = version

    def sync(self, redis: Any) -> list[dict]:
        """The feeds to run: Redis's registry, restored from the copy first when Redis has lost it; the copy is
        rewritten after every change. RegistryUnknown when Redis has lost the registry and the copy cannot be read
        (a caller keeps the readers it has rather than stopping them)."""
        client = as_client(redis)
        version, feeds = read_registry(client)
        lost = registry_lost(version, feeds) or (version is not None and self.version is not None
                                                 and version < self.version)
        if lost or not self._read:
            copy = self._load(must=registry_lost(version, feeds))
            if copy is not None and (version is None or version < copy[0]):
                self._restore(client, version, copy)
                version, feeds = read_registry(client)
        if version is not None and version != self.version:
            self._save(version, feeds)
        elif version is None and feeds:            # a registry written before versions existed: start one
            client.incr(VERSION_KEY)
        return feeds

    # ---- internals ------------------------------------------------------------------------------------------
    def _load(self, must: bool) -> tuple[int, list[dict]] | None:
        try:
            copy = self.load()
        except Exception as e:  # noqa: BLE001 - a copy that cannot be read cannot restore anything
            if must:
                raise RegistryUnknown(f"Redis holds no feed registry and its durable copy {self.path} cannot be "
                                      f"read ({type(e).__name__}: {e})") from e
            if not self._read:
                log.warning("feed registry copy %s cannot be read: %s: %s", self.path, type(e).__name__, e)
            self._read = True
            return None
        self._read = True
        if copy is not None:
            self.version = copy[0]
        return copy

    def _restore(self, client, version: int | None, copy: tuple[int, list[dict]]) -> None:
        from pipeline.events import DEFAULT_MAXLEN, ERRORS_STREAM, flatten_fields

        copy_version, feeds = copy
        pipe = client.pipeline(transaction=True)
        for feed in feeds:
            pipe.hsetnx(FEEDS_KEY, feed["id"], json.dumps(feed))
        pipe.set(VERSION_KEY, max(copy_version, version or 0) + 1)
        restored = sum(bool(n) for n in pipe.execute()[:-1])
        if not restored:
            return
        message = (f"Redis came back without the feed registry (is it running without persistence? see README, "
                   f"Redis): restored {restored} feeds from {self.path}")
        log.error(message)
        metrics.record_registry_restored()
        try:
            client.xadd(ERRORS_STREAM, flatten_fields({"kind": "feed_registry_restored", "stage": "feeds",
                                                       "feeds": str(restored), "error": message,
                                                       "time": time.time()}),
                        maxlen=DEFAULT_MAXLEN, approximate=True)
        except Exception as e:  # noqa: BLE001 - the log and the metric above still say it
            log.warning("could not report the registry restore on %s: %s", ERRORS_STREAM, e)

    def _save(self, version: int, feeds: list[dict]) -> None:
        try:
            self.save(version, feeds)
            self._save_failed_for = None
        except Exception as e:  # noqa: BLE001 - Redis has the registry; the next change or round tries again
            if self._save_failed_for != version:
                log.warning("feed registry copy %s not written (%s: %s); Redis is then the only copy",
                            self.path, type(e).__name__, e)
            self._save_failed_for = version
