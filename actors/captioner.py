"""Caption actors: a pool of Ray actors, each holding one Captioner (pipeline.captioner), fed batches of footage rows.

Each actor reads the segments' tokens from the index itself, so only row metadata goes out and captions (text and one
vector each) come back; the caller writes them (pipeline.captioning.CaptionWriter), so the retrieval index has one
writer. At most IN_FLIGHT_PER_ACTOR batches wait per actor, so the rows held anywhere stay bounded by the follower's
queue. An actor that dies is replaced and its batch comes back as the error, for the follower to retry.
"""
from __future__ import annotations

from typing import Iterator

import ray

IN_FLIGHT_PER_ACTOR = 2           # one batch running and one queued: the actor never waits for the driver


class CaptionWorker:
    """The Ray actor: Captioner + the index it reads tokens from."""

    def __init__(self, model_path: str, index_root: str, max_new_tokens: int, batch_size: int,
                 dtype: str = "auto"):
        from pipeline.captioner import Captioner
        from pipeline.index import SegmentIndex

        self.index = SegmentIndex(index_root, create=False)
        self.captioner = Captioner(model_path, dtype=dtype, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def identity(self) -> tuple[str, int]:
        """(model_id, vector dimension) of the captions this actor writes."""
        return self.captioner.model_id, self.captioner.hidden_size

    def caption(self, rows: list[dict]):
        from pipeline.captioning import describe_rows

        return describe_rows(self.index, self.captioner, rows)


class CaptionPool:
    """`num_caption_actors` CaptionWorkers on the Ray cluster (`ray.init` done by the caller)."""

    def __init__(self, settings, model_path: str | None = None):
        """model_path: the checkpoint whose tokens the index holds (default: the configured one); the captions are
        written by settings.caption_model_path when set, else by that same checkpoint."""
        from pipeline.checkpoints import model_id

        model_path = str(model_path or settings.resolved_model_path())
        caption_path = str(settings.resolved_caption_model_path(model_path))
        self.token_model_id = model_id(model_path)
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 and settings.gpus_per_encoder > 0 else 0.0
        options = {"num_cpus": settings.caption_cpus, "num_gpus": gpus, "max_restarts": 0}
        self._make = lambda: ray.remote(CaptionWorker).options(**options).remote(
            caption_path, str(settings.index_root),
            settings.caption_max_new_tokens, settings.caption_batch_size,
            settings.decoder_dtype)
        self.actors = [self._make() for _ in range(settings.num_caption_actors)]
        self.model_id, self.dim = ray.get(self.actors[0].identity.remote())

    def map(self, row_batches: list[list[dict]]) -> Iterator[tuple[list[dict], object]]:
        """(rows, captions or the exception) per batch, in the order batches finish."""
        todo = list(enumerate(row_batches))[::-1]
        running: dict = {}                                       # ref -> (actor slot, batch)
        load = [0] * len(self.actors)
        while todo or running:
            while todo and min(load) < IN_FLIGHT_PER_ACTOR:
                slot = load.index(min(load))
                _, rows = todo.pop()
                running[self.actors[slot].caption.remote(rows)] = (slot, rows)
                load[slot] += 1
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, rows = running.pop(ref)
            load[slot] -= 1
            try:
                yield rows, ray.get(ref)
            except ray.exceptions.RayActorError as e:           # the actor died: replace it, hand back the error
                self.actors[slot] = self._make()
                yield rows, e
            except Exception as e:  # noqa: BLE001 - a failed batch (RayTaskError): the follower retries its rows
                yield rows, e

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
