"""`tubescope`: the command line.

Commands whose issue has not landed yet are stubs: they say so on stderr and exit 2, and never print a made-up
result. When an issue lands, replace its entry in STUBS with the real command.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from fractions import Fraction
from pathlib import Path

import click

from pipeline.settings import Settings, load_settings, redact_url, settings_json

STUB_EXIT = 2
DEMO_STREAM = "tubescope:demo"
DEMO_CLIP = dict(width=320, height=180, fps=30, seconds=4.0)   # small, 16:9, moving content
TINY_MODEL_NOTE = ("the tiny model has random weights: its outputs are meaningless; set TUBESCOPE_MODEL_PATH to a "
                   "Qwen2-VL checkpoint folder (Hugging Face layout) for real answers")

# name -> (issue, what it does); help text and the stub message come from here
STUBS: dict[str, tuple[int, str]] = {
    "ask": (5, "ask a question over a time window of footage"),
    "search": (5, "search footage for a natural-language query"),
    "serve": (5, "run the REST API and the decoder on Ray Serve"),
    "feeds": (5, "add, list and remove live camera feeds"),
    "bench": (3, "run the benchmarks (encoder: issue 3; decode/ingest: issue 4; query: issue 5)"),
}
# parts of the whole job the demo cannot run yet: (what, issue)
DEMO_MISSING = [("indexing the clip into the footage index (Ray Data + encoder actors)", 4),
                ("asking questions over the indexed footage (Ray Serve decoder)", 5)]


def not_implemented(name: str, issue: int, what: str) -> None:
    click.echo(f"not implemented yet: lands with issue {issue} ({name}: {what})", err=True)
    sys.exit(STUB_EXIT)


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


def _make_stub(name: str, issue: int, what: str) -> click.Command:
    @click.command(name, help=f"{what} [not implemented yet: issue {issue}]",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args):
        not_implemented(name, issue, what)
    return stub


for _name, (_issue, _what) in STUBS.items():
    cli.add_command(_make_stub(_name, _issue, _what))


# ---- config ------------------------------------------------------------------------------------------------------
@cli.command("config")
@click.pass_context
def config_cmd(ctx: click.Context) -> None:
    """Print the effective settings as JSON (secrets hidden)."""
    click.echo(settings_json(current_settings(ctx)))


# ---- model -------------------------------------------------------------------------------------------------------
@cli.group("model")
def model_group() -> None:
    """Model checkpoints."""


@model_group.command("init-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def model_init_tiny(directory: Path) -> None:
    """Write a tiny random Qwen2-VL checkpoint (Hugging Face layout) into DIRECTORY."""
    write = _qwen2vl_attr("write_tiny_checkpoint")
    if write is None:
        not_implemented("model init-tiny", 3, "tiny random checkpoints")
    out = write(directory)
    click.echo(f"wrote a tiny random Qwen2-VL checkpoint to {Path(out).resolve()}")


def _qwen2vl_attr(name: str):
    """qwen2vl.<name>, or None while issue 3 has not provided it."""
    import importlib

    for module in ("qwen2vl", "qwen2vl.processor", "qwen2vl.checkpoint"):   # public name first
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


# ---- index / segments (issue 4) -------------------------------------------------------------------------------------
@cli.command("index")
@click.argument("paths", nargs=-1, required=True)
@click.option("--source-id", default=None, help="source id for the footage (default: each file's name)")
@click.option("--json", "as_json", is_flag=True, help="print the job report as JSON")
@click.pass_context
def index_cmd(ctx: click.Context, paths: tuple[str, ...], source_id: str | None, as_json: bool) -> None:
    """Index video files, folders, globs or pyarrow.fs URIs into the footage index.

    Exit 0 when everything was indexed, 2 when some inputs failed, 1 when none was indexed.
    """
    from deploy.runtime import local_runtime
    from pipeline.archive import index_archive

    settings = current_settings(ctx)
    with local_runtime(settings) as rt:
        report = index_archive(list(paths), settings, source_id=source_id, index=rt.index, events=rt.events,
                               progress=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"indexed {len(report.indexed)} file(s), {report.segments} new segment(s) "
                   f"({report.skipped} already indexed), {report.source_seconds:.1f} s of video in {report.seconds:.1f} s")
        for f in report.failed:
            click.echo(f"FAILED {f['path']}: {f['error']}", err=True)
        click.echo(f"index: {settings.index_root}; events: Redis stream tubescope:segments")
    sys.exit(report.exit_code)


@cli.command("segments")
@click.argument("source")
@click.option("--start", type=float, default=None, help="window start (seconds; epoch seconds for live feeds)")
@click.option("--end", type=float, default=None, help="window end")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def segments_cmd(ctx: click.Context, source: str, start: float | None, end: float | None, as_json: bool) -> None:
    """List the indexed segments of SOURCE that overlap [start, end)."""
    from pipeline.index import SegmentIndex

    settings = current_settings(ctx)
    rows = SegmentIndex(settings.index_root).list(source, start=start, end=end)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=list))
        return
    for r in rows:
        click.echo(f"{r['segment_id']}\t{r['t0']:.2f}-{r['t1']:.2f}\tgrid {tuple(r['grid_thw'])}\t{r['n_tokens']} tokens"
                   f"\t{r['model_id']}")
    if not rows:
        click.echo(f"no segments for source {source!r} in that window", err=True)


# ---- demo --------------------------------------------------------------------------------------------------------
@cli.command("demo")
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run what exists of the whole job on a small sample clip and say what is still missing."""
    from pipeline.redis_server import redis_endpoint

    settings = current_settings(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    say = click.echo
    failures: list[str] = []
    say(f"tubescope demo: data dir {settings.data_dir}")

    with redis_endpoint(settings) as redis_ep:
        if redis_ep.embedded:
            say(f"[redis] embedded redis-server started, listening on {redis_ep.url} (dir {settings.redis_dir})")
        else:
            say(f"[redis] using REDIS_URL {redact_url(redis_ep.url)}")

        clip = demo_clip(settings.data_dir / "samples" / "demo.mp4")
        n_frames, size, duration = _probe(clip)
        say(f"[clip] {clip}: {size[0]}x{size[1]}, {n_frames} frames, {duration:.1f} s "
            "(generated with PyAV: tubescope bundles no video file)")
        frames = sample_frames(clip, settings.fps)
        say(f"[decode] sampled {len(frames)} frames at {settings.fps:g} fps with PyAV")

        event = {"kind": "demo", "clip": str(clip), "frames_sampled": str(len(frames)), "at": f"{time.time():.3f}"}
        try:
            event.update(_demo_model(settings, frames, say))
        except Exception as e:   # a component that exists but fails: report it, finish the demo, exit non-zero
            failures.append(f"model: {type(e).__name__}: {e}")
            say(f"[model] FAILED: {type(e).__name__}: {e}")

        client = redis_ep.client(decode_responses=True)
        try:
            entry = client.xadd(DEMO_STREAM, event, maxlen=settings.stream_maxlen, approximate=True)
            say(f"[redis] wrote the demo event to stream {DEMO_STREAM!r}, entry {entry} "
                f"(read it: XRANGE {DEMO_STREAM} - +)")
        finally:
            client.close()
        if redis_ep.embedded:
            say(f"[redis] stopping the embedded server; its data is saved in {settings.redis_dir / 'dump.rdb'}")

    say("not there yet:")
    for what, issue in DEMO_MISSING:
        say(f"  - {what}: lands with issue {issue}")
    if failures:
        say("demo finished with failures: " + "; ".join(failures), err=True)
        sys.exit(1)
    say("demo done")


def _demo_model(settings: Settings, frames, say) -> dict:
    """Write/load the checkpoint and run the vision tower on the sampled frames, as far as qwen2vl provides."""
    write, load = _qwen2vl_attr("write_tiny_checkpoint"), _qwen2vl_attr("load_pretrained")
    path = settings.resolved_model_path()
    if settings.uses_tiny_model:
        if not (path / "config.json").is_file():
            if write is None:
                say("[model] not there yet: the tiny checkpoint writer lands with issue 3")
                return {"model": "none"}
            write(path)
            say(f"[model] wrote a tiny random checkpoint to {path}")
        say(f"[model] {TINY_MODEL_NOTE}")
    if load is None:
        say("[model] not there yet: loading checkpoints lands with issue 3")
        return {"model": str(path)}
    import torch

    model = load(path)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"[model] loaded {path} ({n_params:,} parameters)")
    processor_cls = _qwen2vl_attr("Processor")
    if processor_cls is None:
        say("[model] the processor lands with issue 3: vision tower not run")
        return {"model": str(path)}
    processor = processor_cls.from_pretrained(path)
    frames = frames[: settings.frames_per_segment]          # one segment's worth
    pixel_rows, grid_thw = processor.preprocess_video(frames)
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens = model.visual(pixel_rows, torch.tensor([grid_thw]))
    dt = time.perf_counter() - t0
    say(f"[encode] vision tower: {len(frames)} frames -> grid {tuple(grid_thw)} -> {tuple(tokens.shape)} visual "
        f"tokens in {dt:.2f} s (kept in memory: the footage index lands with issue 4)")
    return {"model": str(path), "grid_thw": json.dumps(list(grid_thw)), "visual_tokens": str(tokens.shape[0])}


def demo_clip(path: Path) -> Path:
    """The demo's sample clip, encoded with PyAV on first use (a box moving over a shifting gradient)."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h, fps = DEMO_CLIP["width"], DEMO_CLIP["height"], DEMO_CLIP["fps"]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        xs, ys = np.meshgrid(np.arange(w), np.arange(h))
        for i in range(int(DEMO_CLIP["seconds"] * fps)):
            img = np.stack([(xs + 4 * i) % 256, (ys * 255 // h) + 0 * xs, np.full_like(xs, (60 + 3 * i) % 256)], -1)
            x0 = (i * 5) % (w - 40)
            img[60:100, x0:x0 + 40] = 255
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.replace(path)        # atomic: a crash never leaves a half-written clip under the final name
    return path


def _probe(path: Path) -> tuple[int, tuple[int, int], float]:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        size = (s.codec_context.width, s.codec_context.height)
        n = sum(1 for _ in c.decode(s))
        duration = float(c.duration / 1e6) if c.duration else 0.0
    return n, size, duration


def sample_frames(path: Path, fps: float):
    """RGB frames uint8 [T, H, W, 3] at `fps` by presentation time: the first frame at or after each k/fps."""
    import av
    import numpy as np

    out, next_t = [], 0.0
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.video[0]):
            t = float(frame.pts * frame.time_base)
            if t + 1e-6 >= next_t:
                out.append(frame.to_ndarray(format="rgb24"))
                next_t += 1.0 / fps
    return np.stack(out)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="tubescope")


if __name__ == "__main__":
    main()
