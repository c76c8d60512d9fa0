"""Archive encoder actors that outlive a job, fed the decoded blocks of Ray Data by reference.

Starting an encoder costs a worker process, the torch import and the checkpoint load: about 2 CPU-seconds with the
tiny model, taken from the decode tasks on the same cores (on 2 cores, 1 s of an 11 s job over 600 s of footage), and
more with a real checkpoint. An encoder that reserves no resources (the CPU default: encoder_cpus=0, no GPU) costs
only memory while idle, so it is a named, detached actor that later jobs on the cluster find loaded, and that ends
itself after `encoder_keepalive_seconds` without work. An encoder that reserves CPUs or GPUs ends with its job: an
idle reservation would hold up other work.

A job hands each decoded block to an actor as an ObjectRef (the tubes never pass through the driver); the actor
encodes it in batches of `encoder_batch_segments` rows. At most IN_FLIGHT_PER_ACTOR calls wait per actor, so the
driver stops pulling blocks when the encoders are behind and Ray Data's backpressure holds the decode tasks back.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Iterable, Iterator

IN_FLIGHT_PER_ACTOR = 2          # one call running and one queued: the actor never waits for the driver
MAX_ATTEMPTS = 3                 # per block: an actor that died (ended idle, crashed) is replaced this often
_IDLE_CHECK_S = 5.0
NAMESPACE = "tubescope"          # of kept actors: jobs of every driver on the cluster find them (detached needs one)


class EncoderHost:
    """The Ray actor: one encoder object (encoder_cls(**kwargs)) applied to Ray Data blocks in row batches."""

    def __init__(self, encoder_cls, kwargs: dict, keepalive_s: float = 0.0):
        self.encoder = encoder_cls(**kwargs)
        self.keepalive_s = float(keepalive_s)
        self._lock = threading.Lock()
        self._busy, self._last = 0, time.monotonic()
        if self.keepalive_s > 0:
            threading.Thread(target=self._end_when_idle, name="encoder-keepalive", daemon=True).start()

    def encode(self, block, start: int, end: int | None, batch_size: int) -> list[dict]:
        """Rows [start, end) of a block -> the encoder's output, one numpy batch per `batch_size` rows."""
        from ray.data.block import BlockAccessor

        with self._lock:
            self._busy += 1
        try:
            rows = BlockAccessor.for_block(block)
            end = rows.num_rows() if end is None else end
            return [self.encoder(BlockAccessor.for_block(rows.slice(lo, min(end, lo + batch_size)))
                                 .to_batch_format("numpy"))
                    for lo in range(start, end, max(1, batch_size))]
        finally:
            with self._lock:
                self._busy -= 1
                self._last = time.monotonic()

    def _end_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(min(self.keepalive_s, _IDLE_CHECK_S))
            with self._lock:
                idle = self._busy == 0 and time.monotonic() - self._last >= self.keepalive_s
            if idle:    # a job that fetched this actor a moment ago replaces it (MAX_ATTEMPTS)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


class EncoderPool:
    """`n` EncoderHost actors for one encoder configuration; kept (named, detached) when they reserve nothing."""

    def __init__(self, encoder_cls, kwargs: dict, n: int, *, num_cpus: float = 0.0, num_gpus: float = 0.0,
                 runtime_env: dict | None = None, keepalive_s: float = 0.0):
        import ray

        self.kept = keepalive_s > 0 and not num_cpus and not num_gpus
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0}
        if runtime_env:
            options["runtime_env"] = runtime_env
        if self.kept:
            # The name is the configuration: a job finds only actors built from the same class (by value for a
            # class defined in a function), arguments and options.
            from ray import cloudpickle

            key = hashlib.sha1(cloudpickle.dumps((encoder_cls, sorted(kwargs.items()), num_cpus, num_gpus,
                                                   sorted((runtime_env or {}).get("env_vars", {}).items())))
                               ).hexdigest()[:16]
            options.update(lifetime="detached", get_if_exists=True, namespace=NAMESPACE)
            self._names = [f"tubescope-encoder-{key}-{i}" for i in range(n)]
        else:
            self._names = [None] * n
        self._remote = ray.remote(EncoderHost)
        self._options, self._args = options, (encoder_cls, kwargs, keepalive_s if self.kept else 0.0)
        self.actors = [self._start(i) for i in range(n)]

    def _start(self, i: int):
        options = dict(self._options)
        if self._names[i] is not None:
            options["name"] = self._names[i]
        return self._remote.options(**options).remote(*self._args)

    def replace(self, i: int) -> None:
        """Actor i died: start (or find, when another job already did) its successor."""
        self.actors[i] = self._start(i)

    def release(self) -> None:
        """End the actors unless they are kept for the next job."""
        import ray

        if not self.kept:
            for actor in self.actors:
                ray.kill(actor)

    def encode_bundles(self, bundles: Iterable, batch_size: int) -> Iterator[dict]:
        """Ray Data RefBundles of decoded rows -> the encoder's output batches, in the order they finish."""
        import ray

        pending: dict = {}                  # ObjectRef -> (actor index, actor, (block ref, start, end), attempts)
        load = [0] * len(self.actors)

        def submit(part, attempts: int) -> None:
            i = min(range(len(load)), key=load.__getitem__)
            actor = self.actors[i]
            pending[actor.encode.remote(*part, batch_size)] = (i, actor, part, attempts)
            load[i] += 1

        def finish_one() -> list[dict]:
            done, _ = ray.wait(list(pending), num_returns=1)
            i, actor, part, attempts = pending.pop(done[0])
            load[i] -= 1
            try:
                return ray.get(done[0])
            except ray.exceptions.RayActorError:
                if attempts + 1 >= MAX_ATTEMPTS:
                    raise
                if self.actors[i] is actor:          # the first of its failed calls replaces it
                    self.replace(i)
                submit(part, attempts + 1)
                return []

        try:
            for bundle in bundles:
                for entry, piece in zip(bundle.blocks, bundle.slices):
                    part = (entry.ref, 0, None) if piece is None else (entry.ref, piece.start_offset, piece.end_offset)
                    while len(pending) >= IN_FLIGHT_PER_ACTOR * len(self.actors):
                        yield from finish_one()
                    submit(part, 0)
            while pending:
                yield from finish_one()
        finally:
            for ref in pending:              # the job stopped early: calls not yet started are dropped
                ray.cancel(ref)
