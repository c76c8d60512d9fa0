"""`tubescope`: the command line. Benchmarks run from the repository (`make bench`, bench/*.py), not from here."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from pipeline.settings import Settings, load_settings, settings_json
from pipeline.video.protocols import redact_url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="settings file (TOML, YAML or JSON); default: $TUBESCOPE_CONFIG")
@click.option("-v", "--verbose", is_flag=True, help="log progress (INFO)")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, verbose: bool) -> None:
    """tubescope: streaming video analytics on Qwen2-VL (Ray, Redis)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["config_file"] = config_file


def current_settings(ctx: click.Context) -> Settings:
    """The effective settings; a bad value or file exits 2 with pydantic's message naming the field."""
    try:
        return load_settings(config_file=ctx.obj.get("config_file"))
    except ValueError as e:
        raise click.UsageError(f"bad settings: {e}") from e


def window_options(command):
    """--start and --end as people write times: seconds (epoch for live feeds, media time for archives), ISO 8601,
    -2h, today, 'yesterday 14:00', +1:30 into an archive (pipeline.times; the zone is settings.time_zone)."""
    for name in ("--end", "--start"):
        command = click.option(name, default=None, metavar="TIME",
                               help=f"window {name[2:]}: 1765000000, 2026-12-06T14:00+01:00, -2h, 'yesterday 14:00', "
                                    "+1:30")(command)
    return command


# ---- config ------------------------------------------------------------------------------------------------------
@cli.command("config")
@click.pass_context
def config_cmd(ctx: click.Context) -> None:
    """Print the effective settings as JSON (secrets hidden)."""
    click.echo(settings_json(current_settings(ctx)))


# ---- index / segments ----------------------------------------------------------------------------------------------
@cli.command("index")
@click.argument("paths", nargs=-1, required=True)
@click.option("--source-id", default=None, help="source id for the footage (default: each file's name)")
@click.option("--reencode-long", is_flag=True,
              help="also fill the long-video tier (long_pixels) of segments indexed before it existed")
@click.option("--thumbnails", is_flag=True, help="also fill the thumbnails of segments indexed before they existed")
@click.option("--json", "as_json", is_flag=True, help="print the job report as JSON")
@click.pass_context
def index_cmd(ctx: click.Context, paths: tuple[str, ...], source_id: str | None, reencode_long: bool,
              thumbnails: bool, as_json: bool) -> None:
    """Index video files, folders, globs or pyarrow.fs URIs into the footage index.

    Exit 0 when everything was indexed, 2 when some inputs failed, 1 when none was indexed. Re-running is cheap:
    what is indexed is skipped (with --reencode-long, what has its long tier too; with --thumbnails, what has its
    thumbnail too).
    """
    from deploy.runtime import local_runtime
    from actors.encoder import VisionEncoder
    from pipeline.archive import index_archive
    from pipeline.captioning import caption_follower, find_backlog

    settings = current_settings(ctx)
    with local_runtime(settings) as rt:
        captions = None
        if settings.captions:            # a caption actor pool works beside the encoders, following the index
            from actors.captioner import CaptionPool

            captions = caption_follower(settings, rt.index, CaptionPool(settings, str(rt.model_path)), rt.events,
                                        poll_s=1.0).start()
        if reencode_long and not settings.long_pixels:
            raise click.UsageError("--reencode-long needs the long tier on: long_pixels is 0")
        report = index_archive(list(paths), settings, VisionEncoder, source_id=source_id, index=rt.index,
                               events=rt.events, progress=True, reencode_long=reencode_long,
                               thumbnails=thumbnails)
        if captions is not None:         # then what it has not reached yet, for this job's sources
            captions.stop()
            captions.sources = report.sources
            backlog = find_backlog(captions.store, captions.pool.model_id, report.sources,
                                   token_model_id=captions.pool.token_model_id)
            with _bar("captions", backlog.segments) as bar:
                captions.catch_up(bar.update)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"indexed {len(report.indexed)} file(s), {report.segments} new segment(s) "
                   f"({report.skipped} already indexed), {report.long_tier} long-tier file(s), "
                   f"{report.source_seconds:.1f} s of video in {report.seconds:.1f} s")
        for f in report.failed:
            click.echo(f"FAILED {f['path']}: {f['error']}", err=True)
        click.echo(f"index: {settings.index_root}; events: Redis stream tubescope:segments")
    sys.exit(report.exit_code)


@cli.command("segments")
@click.argument("source")
@window_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def segments_cmd(ctx: click.Context, source: str, start: str | None, end: str | None, as_json: bool) -> None:
    """List the indexed segments of SOURCE that overlap [start, end)."""
    from pipeline.index import SegmentIndex
    from pipeline.index_files import IndexUnavailable
    from pipeline.times import parse_time, with_times

    settings = current_settings(ctx)
    try:
        start = parse_time(start, "--start", tz=settings.time_zone)
        end = parse_time(end, "--end", tz=settings.time_zone)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    try:                                  # a query never creates an index: a wrong or unmounted root is an error
        index = SegmentIndex(settings.index_root, create=False)
        rows = index.list(source, start=start, end=end)
    except IndexUnavailable as e:
        raise click.ClickException(str(e)) from None
    if settings.captions:
        from pipeline.captioning import with_captions
        from pipeline.captions import CaptionStore
        from pipeline.checkpoints import model_id

        rows = with_captions(CaptionStore(index), rows, model_id(settings.resolved_caption_model_path()),
                             settings.index_root)
    rows = [with_times(r, settings.time_zone) for r in rows]
    print_rows(rows, as_json, lambda r: f"{r['segment_id']}\t{r['start']} - {r['end']}\tgrid {tuple(r['grid_thw'])}"
                                       f"\t{r['n_tokens']} tokens\t{r['model_id']}\t{r.get('caption') or ''}",
               f"no segments for source {source!r} in that window")


# ---- captions ------------------------------------------------------------------------------------------------------
def _bar(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="segment", file=sys.stderr)


@cli.group("captions")
def captions_group() -> None:
    """Captions and the retrieval index of indexed footage."""


@captions_group.command("backfill")
@click.argument("source", required=False)
@click.pass_context
def captions_backfill(ctx: click.Context, source: str | None) -> None:
    """Caption every indexed segment of SOURCE (default: every source) that has no caption yet. Idempotent; stop it
    any time and run it again to resume."""
    from deploy.runtime import local_runtime
    from pipeline.captioner import Captioner
    from pipeline.captioning import LocalCaptioning, caption_follower, find_backlog
    from pipeline.checkpoints import model_id

    settings = current_settings(ctx)
    with local_runtime(settings, ray_init=False) as rt:
        captioner = Captioner(settings.resolved_caption_model_path(rt.model_path),
                              max_new_tokens=settings.caption_max_new_tokens, batch_size=settings.caption_batch_size)
        pool = LocalCaptioning(rt.index, captioner, token_model_id=model_id(rt.model_path))
        follower = caption_follower(settings, rt.index, pool, rt.events, sources=[source] if source else None)
        backlog = find_backlog(follower.store, pool.model_id, follower.sources, token_model_id=pool.token_model_id)
        with _bar("captions", backlog.segments) as bar:
            n = follower.catch_up(bar.update)
    click.echo(f"captioned {n} segment(s); {follower.backlog.segments} still missing"
               + (f" ({len(follower.failed)} failed: see Redis stream tubescope:errors)" if follower.failed else ""))
    sys.exit(1 if follower.failed else 0)


@captions_group.command("reindex")
@click.pass_context
def captions_reindex(ctx: click.Context) -> None:
    """Rebuild the retrieval index from the captions stored in the footage index (the truth)."""
    from pipeline.captions import CaptionStore
    from pipeline.captioning import rebuild_retrieval
    from pipeline.checkpoints import model_id
    from pipeline.index import SegmentIndex
    from pipeline.index_files import IndexUnavailable
    from pipeline.retrieval import RetrievalIndex
    from qwen2vl.config import Qwen2VLConfig

    settings = current_settings(ctx)
    try:
        store = CaptionStore(SegmentIndex(settings.index_root, create=False))
    except IndexUnavailable as e:
        raise click.ClickException(str(e)) from None
    mid = model_id(settings.resolved_caption_model_path())
    config = Qwen2VLConfig.from_dict(json.loads((settings.resolved_caption_model_path() / "config.json").read_text()))
    dim = config.text.hidden_size                # the width of the captioner's vectors
    with _bar("rows", None) as bar:
        n = rebuild_retrieval(store, RetrievalIndex(settings.index_root), mid, dim=dim,
                              progress=lambda total: bar.update(total - bar.n),
                              token_model_id=model_id(settings.resolved_model_path()))
    click.echo(f"retrieval index rebuilt: {n} caption(s) of {mid}")


def print_rows(rows: list[dict], as_json: bool, line, empty: str) -> None:
    """Rows as JSON, or one `line(row)` each; `empty` goes to stderr when there are none."""
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=list))
        return
    for r in rows:
        click.echo(line(r))
    if not rows:
        click.echo(empty, err=True)


# ---- REST API commands ---------------------------------------------------------------------------------------------
def api_options(fn):
    """--url / --key of the REST API (defaults: $TUBESCOPE_API_URL, $TUBESCOPE_API_KEY)."""
    fn = click.option("--key", envvar="TUBESCOPE_API_KEY", default=None, show_envvar=True,
                      help="API key (Bearer)")(fn)
    fn = click.option("--url", envvar="TUBESCOPE_API_URL", default="http://127.0.0.1:8000", show_envvar=True,
                      show_default=True, help="base URL of `tubescope serve`")(fn)
    return fn


def _api(url: str, key: str | None):
    from deploy.client import TubescopeClient

    return TubescopeClient(url, key)


def _api_call(fn):
    """Run fn(); an API error exits 1 with the server's message on stderr."""
    from deploy.client import ApiError

    try:
        return fn()
    except ApiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@cli.group("feeds")
def feeds_group() -> None:
    """Live camera feeds of a running `tubescope serve` (admin key to add or remove)."""


@feeds_group.command("add")
@click.argument("feed_url", metavar="URL")
@click.option("--name", default=None)
@click.option("--id", "feed_id", default=None, help="feed id (= source id); default: random")
@click.option("--fps", type=float, default=None, help="sampling rate for this feed (default: settings.fps)")
@click.option("--max-pixels", type=int, default=None, help="per-frame pixel cap for this feed")
@click.option("--record/--no-record", default=True, show_default=True, help="record the feed for clips")
@api_options
def feeds_add(feed_url: str, name, feed_id, fps, max_pixels, record: bool, url: str, key: str | None) -> None:
    """Register the feed at URL (rtsp://, http(s)://, udp://, srt://, or a file under file_roots)."""
    with _api(url, key) as api:
        feed = _api_call(lambda: api.add_feed(feed_url, name=name, fps=fps, max_pixels=max_pixels, feed_id=feed_id,
                                              record=None if record else False))
    click.echo(f"added feed {feed['id']} ({feed['name']}): {feed['url']}")


@feeds_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@api_options
def feeds_list(as_json: bool, url: str, key: str | None) -> None:
    """List the registered feeds."""
    with _api(url, key) as api:
        feeds = _api_call(api.list_feeds)
    print_rows(feeds, as_json, lambda f: f"{f['id']}\t{f['name']}\t{f['url']}", "no feeds registered")


@feeds_group.command("show")
@click.argument("feed_id")
@api_options
def feeds_show(feed_id: str, url: str, key: str | None) -> None:
    """A feed's record and its reader's status, as JSON."""
    with _api(url, key) as api:
        click.echo(json.dumps(_api_call(lambda: api.get_feed(feed_id)), indent=2))


@feeds_group.command("rm")
@click.argument("feed_id")
@api_options
def feeds_rm(feed_id: str, url: str, key: str | None) -> None:
    """Unregister a feed (its reader stops)."""
    with _api(url, key) as api:
        feed = _api_call(lambda: api.remove_feed(feed_id))
    click.echo(f"removed feed {feed['id']}")


def _check_port_free(host: str, port: int) -> None:
    """Fail fast with a clear message: Serve's proxy would otherwise retry binding a taken port for minutes."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise click.UsageError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


@cli.command("serve")
@click.option("--host", default=None, help="bind address (default: settings.host, 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default: settings.port, 8000)")
@click.option("--live/--no-live", default=True, show_default=True, help="index live feeds (LiveIndexer)")
@click.pass_context
def serve_cmd(ctx: click.Context, host: str | None, port: int | None, live: bool) -> None:
    """Run the REST API on Ray Serve with the feed supervisor and the live indexer, until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from deploy.app import run_app, stop_app
    from deploy.auth import generate_key
    from deploy.runtime import TINY_MODEL_NOTE, ensure_model, init_ray, ray_address
    from pipeline.redis_server import redis_endpoint
    from pipeline.settings import ApiKey

    settings = current_settings(ctx)
    host, port = host or settings.host, port or settings.port
    _check_port_free(host, port)
    stop = threading.Event()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with redis_endpoint(settings) as redis_ep:
        generated = None
        update: dict = {"redis_url": redis_ep.url, "host": host, "port": port}
        if not settings.api_keys:      # never run open: a fresh admin key for this run
            generated = generate_key()
            update["api_keys"] = [ApiKey(key=generated, role="admin")]
        settings = settings.model_copy(update=update)
        click.echo(f"[redis] {'embedded server at ' if redis_ep.embedded else 'REDIS_URL '}{redact_url(redis_ep.url)}")
        model_path = ensure_model(settings)
        click.echo(f"[model] {model_path}" + (f"\n[model] NOTE: {TINY_MODEL_NOTE}" if settings.uses_tiny_model else ""))
        init_ray(settings)
        # after ray.init, which installs its own SIGTERM handler (it would abort the process, skipping cleanup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            url = run_app(settings, host=host, port=port, live=live, model_path=str(model_path), quiet=True)
            click.echo(f"tubescope API at {url} (OpenAPI: {url}/docs)")
            if generated:
                click.echo(f"admin API key (generated for this run; set api_keys to keep one): {generated}")
                click.echo(f"  export TUBESCOPE_API_URL={url} TUBESCOPE_API_KEY={generated}")
            else:
                click.echo(f"using the {len(settings.api_keys)} configured API key(s)")
            click.echo("press Ctrl-C (or send SIGTERM) to stop", err=True)
            while not stop.wait(0.5):
                pass
            click.echo("stopping: Serve app, feed readers, live indexer", err=True)
        finally:
            stop_app()
            if not ray_address():
                import ray
                ray.shutdown()
    click.echo("stopped", err=True)


# ---- demo --------------------------------------------------------------------------------------------------------
@cli.command("demo")
@click.pass_context
def demo(ctx: click.Context) -> None:
    """The whole mission on a generated sample clip: Redis, model, index (a REST job), Serve, ask, the answer stream."""
    from deploy.demo import run_demo

    if not run_demo(current_settings(ctx), click.echo):
        sys.exit(1)
    click.echo("demo done")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="tubescope")


from deploy import cli_model  # noqa: E402 - registers the model commands on `cli`
from deploy import cli_questions  # noqa: E402 - registers ask, summarize, search and clip on `cli`

__all__ = ["cli", "main", "cli_model", "cli_questions"]


if __name__ == "__main__":
    main()
