"""How many feed readers the cluster's CPUs hold beside the service's own claims and one archive task.

Ray schedules by claimed CPUs, not by load: a feed reader claims READER_CPUS for as long as its feed is registered,
so readers added without limit leave no claim free for an archive job's tasks (the job waits for resources) or for
the next reader (it never starts). Registration is refused instead, with the numbers (docs/architecture.md,
"Archive jobs").
"""
from __future__ import annotations

from actors.feeds import READER_CPUS
from actors.live import LIVE_INDEXER_CPUS
from pipeline.archive import DECODE_TASK_CPUS
from pipeline.live import live_encoder_count
from pipeline.settings import Settings


def service_cpus(settings: Settings, feeds: int = 0) -> float:
    """CPUs the service claims beside `feeds` readers: decoder replicas, the live encoders those feeds start
    (pipeline.live.live_encoder_count), encoder and caption actors that reserve CPUs, and room for one archive
    task."""
    live = LIVE_INDEXER_CPUS * live_encoder_count(feeds, settings.feeds_per_live_encoder, max(1, feeds))
    return (settings.decoder_replicas * settings.decoder_cpus + live
            + settings.num_encoder_actors * settings.encoder_cpus
            + settings.num_caption_actors * settings.caption_cpus + DECODE_TASK_CPUS)


def reader_capacity(settings: Settings, total_cpus: float) -> int:
    """How many feed readers fit in total_cpus beside service_cpus for that many feeds."""
    feeds = 0
    while (feeds + 1) * READER_CPUS + service_cpus(settings, feeds + 1) <= total_cpus + 1e-9:
        feeds += 1
    return feeds


def check_reader_capacity(settings: Settings, feeds: int, total_cpus: float) -> None:
    """ValueError, saying why, when a reader for one more feed would not fit beside `feeds` registered ones."""
    capacity = reader_capacity(settings, total_cpus)
    if feeds + 1 > capacity:
        raise ValueError(
            f"no capacity left for another feed reader: each claims {READER_CPUS:g} CPU, and the cluster's "
            f"{total_cpus:g} CPUs hold {capacity} beside the service's own {service_cpus(settings, capacity):g} "
            f"(decoder, live encoders, room for one archive task); {feeds} feed(s) are registered. Remove a feed or "
            "add CPUs")


__all__ = ["check_reader_capacity", "reader_capacity", "service_cpus"]
