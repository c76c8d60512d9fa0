"""The one settings object of tubescope.

Values come from, highest priority first: keyword arguments, environment variables (prefix TUBESCOPE_, e.g.
TUBESCOPE_FPS=2; Redis also from the conventional REDIS_URL), an optional settings file (TOML, YAML or JSON, named by
TUBESCOPE_CONFIG or `load_settings(config_file=...)`, top-level keys = field names), then the defaults below.
Every field is documented in README.md ("Configuration"); keep the two in step.
"""
from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (BaseSettings, JsonConfigSettingsSource, PydanticBaseSettingsSource,
                               SettingsConfigDict, TomlConfigSettingsSource, YamlConfigSettingsSource)

from pipeline.key_hashes import MIN_KEY_CHARS, hash_key, key_matches, parse_key_hash
from pipeline.model_hub import CheckpointMissing, is_repo_ref
from pipeline.video.hosts import check_allow_entry
from pipeline.video.protocols import NETWORK_SCHEMES, redact_url
from pipeline.video.segments import frames_per_segment
from qwen2vl.geometry import PATCH_AREA, TEMPORAL_PATCH_SIZE, TOKEN_AREA, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

ENV_PREFIX = "TUBESCOPE_"
CONFIG_FILE_ENV = "TUBESCOPE_CONFIG"
TINY_MODEL_DIRNAME = "tiny-qwen2vl"

# load_settings(config_file=...) hands the file to the source hook below (a classmethod with a fixed signature).
_config_file: ContextVar[Path | None] = ContextVar("tubescope_config_file", default=None)


class ApiKey(BaseModel):
    """One bearer key of the REST API, its role, and optionally the only sources/feeds it may touch.

    The operator gives the plain `key` (environment, settings file, a Kubernetes Secret); it is hashed here, as the
    settings are read, and never kept: settings handed to Ray and held by replicas carry `key_hash` only."""
    model_config = ConfigDict(extra="forbid")

    key_hash: str = Field(repr=False)     # pipeline.key_hashes form; a given key_hash is taken as it is
    role: Literal["admin", "reader"]
    sources: list[str] | None = None      # None: every source

    @model_validator(mode="before")
    @classmethod
    def _hash_plain_key(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "key" not in data:
            return data
        data = dict(data)
        key = data.pop("key")
        if "key_hash" in data:
            raise ValueError("give key or key_hash, not both")
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
            raise ValueError(f"key must be a string of at least {MIN_KEY_CHARS} characters")
        data["key_hash"] = hash_key(key)
        return data

    @field_validator("key_hash", mode="after")
    @classmethod
    def _well_formed(cls, v: str) -> str:
        parse_key_hash(v)
        return v

    def matches(self, key: str) -> bool:
        """Whether key is this key (constant time in the digest comparison)."""
        return key_matches(self.key_hash, key)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True,
                                      validate_default=True)

    # ---- storage ------------------------------------------------------------------------------------------------
    data_dir: Path = Path("./tubescope-data")   # resolved to an absolute path (Ray workers may run elsewhere)
    index_dir: str | None = None                # None: <data_dir>/index; a pyarrow.fs URI (s3://...) also works
    # a checkpoint folder, or a hub repo id ("Qwen/Qwen2-VL-2B-Instruct[@REVISION]") resolved from
    # <data_dir>/models/hub (pipeline/model_hub.py); None: the tiny random model under <data_dir>/models/
    model_path: Path | str | None = None
    model_download: bool = False                # a repo id missing from the local cache is downloaded on first use
    redis_url: str | None = Field(                # None: tubescope starts and owns an embedded Redis
        default=None, validation_alias=AliasChoices("TUBESCOPE_REDIS_URL", "REDIS_URL"), repr=False)
    stream_maxlen: int = Field(100_000, ge=1)  # approximate MAXLEN of every Redis stream
    outbox_max_events: int = Field(10_000, ge=1)  # events kept on disk while Redis is unreachable

    # ---- sampling (the video pixel budget: docs/model.md §2) ----------------------------------------------------
    fps: float = Field(2.0, gt=0)
    segment_seconds: float = Field(8.0, gt=0)
    min_pixels: int = Field(VIDEO_MIN_PIXELS, ge=TOKEN_AREA)   # per frame, 100,352
    max_pixels: int = Field(VIDEO_MAX_PIXELS, ge=TOKEN_AREA)   # per frame, 602,112
    # the long-video tier: every tube is also encoded at this area per frame (docs/architecture.md, "Plans");
    # the default is the video minimum, 128 tokens per tube; 0: no long tier (long windows are narrowed by search)
    long_pixels: int = Field(VIDEO_MIN_PIXELS, ge=0)

    # ---- vision encoder actors ----------------------------------------------------------------------------------
    encoder_token_budget: int = Field(16_384, ge=1)   # patches (pre-merge) per packed encoder batch
    num_encoder_actors: int = Field(1, ge=1)
    # CPUs Ray reserves per encoder actor. 0: it shares the cores of the decode tasks, which take whole CPUs; any
    # reservation leaves fewer decode tasks running while the encoder waits for their output (on 2 cores, one).
    encoder_cpus: float = Field(0.0, ge=0)
    gpus_per_encoder: float = Field(1.0, ge=0)  # used only when the cluster has GPUs
    # weights' dtypes: "auto" is bf16 on a GPU that supports it, fp32 on a CPU (qwen2vl/dtypes.py)
    encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    decoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"   # the decoder and the captioner
    encoder_batch_segments: int = Field(8, ge=1)  # segments per encoder call (a decoded block, this many at a time)
    segments_per_task: int = Field(8, ge=1)       # segments decoded by one archive read task
    # seconds an idle archive encoder that reserves no CPU or GPU stays loaded for the next job; 0: one per job
    encoder_keepalive_seconds: float = Field(60.0, ge=0)

    # ---- captions (docs/architecture.md, "Captions") ----------------------------------------------------------
    captions: bool = True                         # caption and embed every indexed segment; false: search samples
    caption_model_path: Path | str | None = None  # a Qwen2-VL checkpoint (folder or repo id) of the same width for
                                                  # captions and vectors; None: the main checkpoint (model_path)
    caption_batch_size: int = Field(16, ge=1)     # segments per captioner call (batched prefill and decode)
    caption_max_new_tokens: int = Field(32, ge=1, le=256)   # caption length bound, in tokens
    caption_queue_segments: int = Field(256, ge=1)   # backlog rows a captioner holds in memory at once
    num_caption_actors: int = Field(1, ge=1)
    caption_cpus: float = Field(0.0, ge=0)        # CPUs Ray reserves per caption actor (GPUs: gpus_per_encoder rule)
    caption_poll_seconds: float = Field(2.0, gt=0)   # how often an idle caption service looks for new segments
    search_candidates: int = Field(32, ge=1, le=256)   # retrieval hits reranked (text) or compared (image) per search
    search_image_segments: int = Field(2048, ge=1)     # image search: segments compared beyond retrieval; more sampled

    # ---- live feeds -------------------------------------------------------------------------------------------
    # registered feeds per live encoder actor (each its own vision tower, and GPU: gpus_per_encoder rule); the
    # actors follow the feed count, as many as the free CPUs or GPUs allow
    feeds_per_live_encoder: int = Field(8, ge=1)
    feed_queue_segments: int = Field(4, ge=1)     # per-feed queue (reader; live indexer while writes fail); drops oldest
    feed_reconnect_max_seconds: float = Field(30.0, gt=0)  # cap of the exponential reconnect backoff
    feed_schemes: list[str] = list(NETWORK_SCHEMES)   # network schemes of the protocol table, or fewer
    file_roots: list[Path] = []                   # local files the REST API may read (feeds and jobs); none by default
    # host names, addresses and CIDRs a feed may read although loopback or link-local (pipeline/video/hosts.py)
    feed_allow_hosts: list[str] = []
    feed_udp_listen: bool = False                 # udp://:PORT feeds (they bind a port of the node) allowed

    # ---- serving ----------------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[ApiKey] = []                   # JSON list in the environment: [{"key": ..., "role": "admin"}];
                                                  # kept as salted hashes only (ApiKey)
    ask_token_budget: int = Field(16_384, ge=1)   # visual tokens per question; more footage is narrowed by search
    time_zone: str = "UTC"                        # IANA zone of times written without an offset and of times shown
    max_gap_seconds: float = Field(60.0, gt=0)    # longer gaps between selected segments are shortened to this (M-RoPE)
    # a window sampled from the long tier more sparsely than one tube per this many seconds is answered from
    # retrieval instead (the best segments, and the captions of the rest as text)
    long_max_stride_seconds: float = Field(300.0, gt=0)
    plan_caption_lines: int = Field(256, ge=0)    # caption lines of unseen footage in a retrieval plan's prompt
    # request limits of the REST API (413/422 with a message naming the limit)
    api_max_request_bytes: int = Field(64 * 1024, ge=1024)     # request body size (413)
    api_max_question_chars: int = Field(2_000, ge=1)          # ask: question length (422)
    api_max_query_chars: int = Field(500, ge=1)               # search: query length (422)
    api_max_window_seconds: float = Field(31 * 86_400.0, gt=0)  # ask/search: end - start (422)
    api_max_new_tokens: int = Field(512, ge=1)                # ask: max_new_tokens ceiling (422)
    api_default_new_tokens: int = Field(128, ge=1)            # ask: max_new_tokens when the request names none
    api_max_search_results: int = Field(100, ge=1)            # search: limit ceiling (422)
    api_max_job_paths: int = Field(1_000, ge=1)               # jobs: paths per request (422)
    # images of asks and searches (docs/architecture.md, "Images"); the routes that take them allow bodies of
    # api_max_request_bytes plus api_max_images base64 images of api_max_image_bytes
    api_max_images: int = Field(4, ge=1, le=64)               # images per request (422)
    api_max_image_bytes: int = Field(8 << 20, ge=1024)        # one image's encoded bytes (413)
    api_max_image_pixels: int = Field(7680 * 4320, ge=56 * 56)   # one image's width x height before resizing (422)
    job_uri_schemes: list[str] = []               # pyarrow.fs URI schemes jobs may read (e.g. ["s3", "gs"]); none by default
    # the decoder deployment (Ray Serve)
    decoder_replicas: int = Field(1, ge=1)
    decoder_cpus: float = Field(0.25, ge=0)       # per replica; a fraction leaves room for Serve and Ray Data on 2 CPUs
    # GPUs per replica when the cluster has GPUs; >1 splits the decoder's layers over them (qwen2vl/placement.py)
    decoder_gpus: int = Field(1, ge=1, le=16)
    # per replica: the questions decoding together in its batch, and the requests Serve lets in at once (searches
    # and alert scoring included); more wait in Serve's queue (docs/architecture.md, "Batched answers")
    decoder_max_ongoing_requests: int = Field(8, ge=1)
    decoder_max_queued_requests: int = Field(16, ge=1)   # beyond this Serve refuses: 503 with Retry-After
    api_retry_after_seconds: int = Field(5, ge=1)        # the Retry-After of a 503
    api_metrics_public: bool = False              # /metrics without a key (it names every source); else admin key
    # slow clients: the whole request body within this many seconds of the request's headers, else 408 (the app's
    # own limit: Serve's request timeout can be lifted by a client header, and uvicorn has none for bodies)
    api_body_timeout_seconds: float = Field(30.0, gt=0)
    # slow clients: a connection's complete request head within this many seconds of connecting (or of its next
    # request's first byte), else 408 and closed (Serve's proxy, deploy/http_deadlines.py)
    api_header_timeout_seconds: float = Field(10.0, gt=0, allow_inf_nan=False)
    api_keep_alive_seconds: int = Field(90, ge=1)        # an idle kept-alive connection is closed after this (Serve)
    api_request_timeout_seconds: float | None = Field(None, gt=0)   # end to end, streamed answers too (Serve)
    feed_reconcile_seconds: float = Field(5.0, gt=0)     # how often the feed supervisor syncs readers with the registry
    job_reconcile_seconds: float = Field(10.0, gt=0)     # how often the service resumes jobs whose runner is gone

    # ---- standing alerts (docs/architecture.md, "Standing alerts") -----------------------------------------------
    alerts: bool = True                           # score every new live segment against the standing alerts
    alert_threshold: float = Field(2.0, allow_inf_nan=False)   # default score (logit yes - logit no) of a hit
    alert_cooldown_seconds: float = Field(60.0, ge=0)   # default: no repeat hit of an alert on a source within this
    alert_max_count: int = Field(100, ge=1)       # standing alerts at most (each one is scored on every segment)
    api_max_alert_query_chars: int = Field(500, ge=1)   # alerts: query length (422)
    alert_webhook_timeout_seconds: float = Field(5.0, gt=0)   # per POST to a webhook
    alert_webhook_attempts: int = Field(3, ge=1)  # POSTs per hit, with doubling backoff from 0.5 s
    alert_webhook_queue: int = Field(256, ge=1)   # hits waiting for delivery; past this the oldest is dropped, counted
    # ---- recordings and clips (docs/architecture.md, "Recordings and clips") ----------------------------------
    recording: bool = True                        # record every live feed (its packets, not re-encoded); a feed may
                                                  # opt out at registration (record: false)
    recording_chunk_seconds: float = Field(60.0, gt=0, le=3600)   # length of one recording file (cut at keyframes)
    clip_max_seconds: float = Field(600.0, gt=0)  # longest clip window (422 beyond)

    # ---- retention --------------------------------------------------------------------------------------------
    retention_max_age_hours: float | None = Field(None, gt=0)   # None: keep forever
    retention_max_bytes: int | None = Field(None, gt=0)         # None: no size cap
    retention_sweep_seconds: float = Field(60.0, gt=0)         # how often the service applies retention
    metrics_export_port: int = Field(8080, ge=0, le=65535)     # Ray's metrics export on a local cluster; 0: any port
    # a secret: when set, metric labels carry a keyed hash of each source id (pipeline.metrics.source_label) instead
    # of the id, so dashboards and scrapes do not name cameras; None: the ids themselves
    metrics_source_key: str | None = Field(None, min_length=16, repr=False)

    # ---- validation ---------------------------------------------------------------------------------------------
    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("model_path", "caption_model_path", mode="before")
    @classmethod
    def _checkpoint(cls, v: Any) -> Path | str | None:
        """A folder (made absolute: Ray workers may run elsewhere), or a repo id kept as written."""
        if v is None or (isinstance(v, str) and is_repo_ref(v)):
            return v.strip() if isinstance(v, str) else v
        return Path(v).expanduser().resolve()

    @field_validator("file_roots", mode="after")
    @classmethod
    def _absolute_roots(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in v]

    @field_validator("feed_allow_hosts", mode="after")
    @classmethod
    def _allow_entries(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(check_allow_entry(entry) for entry in v))

    @field_validator("time_zone", mode="after")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from pipeline.times import zone

        zone(v)
        return v

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None             # REDIS_URL= (empty) means "not set": use the embedded server
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {redact_url(v)!r}")
        return v

    @field_validator("index_dir", mode="after")
    @classmethod
    def _absolute_index(cls, v: str | None) -> str | None:
        # now, in this process: replicas and Ray workers may start in another working directory
        return v if v is None or "://" in v else str(Path(v).expanduser().resolve())

    @field_validator("feed_schemes", "job_uri_schemes", mode="after")
    @classmethod
    def _lower_schemes(cls, v: list[str]) -> list[str]:
        return [s.lower().rstrip(":/") for s in v]

    @field_validator("feed_schemes", mode="after")
    @classmethod
    def _readable_schemes(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(NETWORK_SCHEMES))
        if unknown:
            raise ValueError(f"feed_schemes {unknown} are not ones a feed reader opens; choose among "
                             f"{', '.join(NETWORK_SCHEMES)} (local files: file_roots)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        frames_per_segment(self.fps, self.segment_seconds)
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")
        if self.long_pixels and self.long_pixels < 4 * TOKEN_AREA:
            raise ValueError(f"long_pixels ({self.long_pixels}) must be 0 (no long tier) or at least "
                             f"{4 * TOKEN_AREA} (2x2 tokens per frame)")
        one_tube = self.max_pixels // PATCH_AREA
        if self.encoder_token_budget < one_tube:
            raise ValueError(
                f"encoder_token_budget ({self.encoder_token_budget} patches) must hold one tube at max_pixels "
                f"({self.max_pixels} px = {one_tube} patches)")
        return self

    # ---- derived values -----------------------------------------------------------------------------------------
    @property
    def frames_per_segment(self) -> int:
        return frames_per_segment(self.fps, self.segment_seconds)

    @property
    def tubes_per_segment(self) -> int:
        return self.frames_per_segment // TEMPORAL_PATCH_SIZE

    @property
    def index_root(self) -> Path | str:
        """Where the SegmentIndex lives: a local Path, or the pyarrow.fs URI string as given."""
        if self.index_dir is None:
            return self.data_dir / "index"
        if "://" in self.index_dir:
            return self.index_dir
        return Path(self.index_dir).expanduser().resolve()

    @property
    def tiny_model_path(self) -> Path:
        return self.data_dir / "models" / TINY_MODEL_DIRNAME

    @property
    def uses_tiny_model(self) -> bool:
        return self.model_path is None

    def resolved_model_path(self) -> Path:
        """The checkpoint folder to load: model_path (a repo id: its snapshot in the local hub cache), or the tiny
        random model's folder (which may not exist yet)."""
        return self._folder(self.model_path) if self.model_path is not None else self.tiny_model_path

    def resolved_caption_model_path(self, default: str | Path | None = None) -> Path:
        """The checkpoint that writes captions and embeds queries: caption_model_path, else `default`, else the
        main one."""
        if self.caption_model_path is not None:
            return self._folder(self.caption_model_path)
        return Path(default) if default is not None else self.resolved_model_path()

    def _folder(self, checkpoint: Path | str) -> Path:
        if isinstance(checkpoint, Path):
            return checkpoint
        from pipeline.model_hub import hub_cache, resolve

        return resolve(checkpoint, hub_cache(self.data_dir), download=self.model_download)

    @property
    def redis_dir(self) -> Path:
        """Working folder of the embedded Redis server (its log, and its dump when persisted)."""
        return self.data_dir / "redis"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    def to_public_dict(self) -> dict[str, Any]:
        """JSON-ready values with secrets hidden: API keys (even their hashes), the metrics label key and any Redis
        password."""
        d = self.model_dump(mode="json")
        d["redis_url"] = redact_url(self.redis_url)
        d["api_keys"] = [{"role": k["role"], "sources": k["sources"]} for k in d["api_keys"]]
        if d["metrics_source_key"] is not None:
            d["metrics_source_key"] = "***"
        d["index_root"] = str(self.index_root)
        try:
            d["resolved_model_path"] = str(self.resolved_model_path())
        except CheckpointMissing as e:           # a repo id not pulled yet: say so instead of failing
            d["resolved_model_path"], d["model_error"] = None, str(e)
        return d

    # ---- sources ------------------------------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        path = _config_file.get()
        if path is None and os.environ.get(CONFIG_FILE_ENV):
            path = Path(os.environ[CONFIG_FILE_ENV])
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if path is not None:
            sources += (_file_source(settings_cls, path),)
        return sources


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"settings file {str(path)!r} does not exist (named by {CONFIG_FILE_ENV} or config_file)")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise ValueError(f"settings file {str(path)!r}: unknown format {suffix!r}, expected .toml, .yaml, .yml or .json")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the effective Settings. `config_file` wins over $TUBESCOPE_CONFIG; `overrides` win over everything.

    Raises ValueError (pydantic's ValidationError is one) naming the bad field and what was expected.
    """
    token = _config_file.set(Path(config_file) if config_file is not None else None)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ValueError(describe_errors(e)) from None
    finally:
        _config_file.reset(token)


def describe_errors(e: ValidationError) -> str:
    """pydantic's errors without the values given: a bad API key or Redis URL must not be printed back."""
    lines = [f"{e.error_count()} invalid setting(s):"]
    for err in e.errors(include_input=False, include_url=False):
        where = ".".join(str(x) for x in err["loc"]) or "settings"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def settings_json(settings: Settings) -> str:
    return json.dumps(settings.to_public_dict(), indent=2, sort_keys=True)


__all__ = ["ApiKey", "Settings", "load_settings", "settings_json", "ENV_PREFIX", "CONFIG_FILE_ENV"]
