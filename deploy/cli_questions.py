"""The question commands of the `tubescope` CLI: ask, summarize, search and clip, through the REST API (registered on
deploy.cli's group when it is imported)."""
from __future__ import annotations

import json

import click

from deploy.cli import _api, _api_call, api_options, cli, print_rows, window_options
from pipeline.times import format_time


def box_lines(boxes: list[dict]) -> list[str]:
    """One line per box of an answer: label, corners in source pixels, the tube's time and segment."""
    return [f"box: {'(unlabelled)' if b['label'] is None else b['label']} "
            f"({b['x1']},{b['y1']})-({b['x2']},{b['y2']}) px at {format_time(b['t'])} ({b['segment_id']})"
            for b in boxes]


def _window(start: str | None, end: str | None) -> str:
    if start is None and end is None:
        return "all footage"
    return f"[{'-inf' if start is None else start}, {'+inf' if end is None else end})"


@cli.command("ask")
@click.argument("question")
@click.option("-s", "--source", "sources", multiple=True, help="source id (repeat for several)")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="an image file to ask about, shown before the footage (repeat for several)")
@window_options
@click.option("--max-new-tokens", type=int, default=None, help="answer length cap (default: the server's)")
@click.option("--temperature", type=float, default=None, help="0: greedy (default: the checkpoint's)")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--seed", type=int, default=None, help="the same seed gives the same sampled answer")
@click.option("--stream/--no-stream", default=True, show_default=True, help="print tokens as they arrive")
@click.option("--json", "as_json", is_flag=True, help="print the whole answer record as JSON")
@api_options
def ask_cmd(question: str, sources: tuple[str, ...], images: tuple[str, ...], start, end, max_new_tokens, temperature,
            top_p, top_k, repetition_penalty, seed, stream: bool, as_json: bool, url: str, key: str | None) -> None:
    """Ask QUESTION over the images and the footage of the given sources in [start, end)."""
    if not sources and not images:
        raise click.UsageError("give footage (-s SOURCE) or an image (--image PATH), or both")
    with _api(url, key) as api:
        live = stream and not as_json
        if live:
            click.echo("answer: ", nl=False)
        out = _api_call(lambda: api.ask(question, list(sources), start=start, end=end, max_new_tokens=max_new_tokens,
                                        on_token=(lambda t: click.echo(t, nl=False)) if live else None,
                                        temperature=temperature, top_p=top_p, top_k=top_k,
                                        repetition_penalty=repetition_penalty, seed=seed, images=list(images)))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo("" if live else f"answer: {out['answer']}")
    for ev in out["evidence"]:
        tubes = f", {len(ev['tubes'])} tubes" if "tubes" in ev else ""
        click.echo(f"evidence: {ev['source']} {ev['start']} - {ev['end']} ({ev.get('segment_id', '')}, "
                   f"{ev.get('tier', 'full')}{tubes})")
    for line in box_lines(out.get("boxes", [])):
        click.echo(line)
    plan = out.get("plan")
    if plan and plan["kind"] == "none":
        click.echo("plan: the images only, no footage")
    elif plan:
        click.echo(f"plan: {plan['kind']}: {plan['tubes']} tubes at {', '.join(plan['resolutions'])}, "
                   f"{plan['segments']} of {plan['window_segments']} segments"
                   + (f", {plan['caption_lines']} caption lines of the rest" if plan.get("caption_lines") else ""))
    if out.get("narrowed"):
        click.echo("note: the window held more footage than the budget; the plan above says what was looked at")
    click.echo(f"model: {out['model']}; Redis stream tubescope:answers entry {out.get('stream_entry')}")


@cli.command("summarize")
@click.option("-s", "--source", "sources", multiple=True, required=True, help="source id (repeat for several)")
@window_options
@click.option("--granularity", type=float, default=None, help="seconds per first-level period (default 300)")
@click.option("--json", "as_json", is_flag=True, help="print the whole summary record as JSON")
@api_options
def summarize_cmd(sources: tuple[str, ...], start, end, granularity, as_json: bool, url: str,
                  key: str | None) -> None:
    """Summarize the footage of the given sources in [start, end): per period, per hour, then the whole window,
    each line printed as it is made."""
    def show(line: dict) -> None:
        cached = " (cached)" if line.get("cached") else ""
        click.echo(f"{line['level']:>6} {line['source']} {line['start']} - {line['end']}{cached}: {line['text']}")

    with _api(url, key) as api:
        out = _api_call(lambda: api.summarize(list(sources), start=start, end=end, granularity=granularity,
                                              on_line=None if as_json else show))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for source, text in out["summaries"].items():
        click.echo(f"summary of {source}: {text}")
    click.echo(f"model: {out['model']}; Redis stream tubescope:summaries")


@cli.command("search")
@click.argument("query", required=False)
@click.option("-s", "--source", "sources", multiple=True, help="source id (repeat; default: every source)")
@click.option("--image", type=click.Path(exists=True, dir_okay=False),
              help="an image file: the segments most like it (with QUERY too: reranked by the query)")
@window_options
@click.option("--limit", type=int, default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@api_options
def search_cmd(query: str | None, sources: tuple[str, ...], image: str | None, start, end, limit: int,
               as_json: bool, url: str, key: str | None) -> None:
    """Rank indexed segments for QUERY, or by likeness to an image (--image)."""
    if query is None and image is None:
        raise click.UsageError("give a QUERY, an --image, or both")
    with _api(url, key) as api:
        rows = _api_call(lambda: api.search(query, list(sources) or None, start=start, end=end, limit=limit,
                                            image=image))
    print_rows(rows, as_json,
               lambda r: f"{r['score']:.4f}\t{r['source']}\t{r['start']} - {r['end']}\t{r['segment_id']}"
                         f"\t{r.get('caption') or ''}",
               f"no segments in {_window(start, end)}")


@cli.command("clip")
@click.argument("source")
@click.option("--start", required=True, metavar="TIME", help="clip start (the forms of --start elsewhere)")
@click.option("--end", required=True, metavar="TIME", help="clip end")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="MP4 file to write")
@click.option("--exact", is_flag=True, help="cut exactly at start and end (re-encodes); default: at keyframes")
@api_options
def clip_cmd(source: str, start: str, end: str, output: str, exact: bool, url: str, key: str | None) -> None:
    """Save the footage of SOURCE in [start, end] as an MP4 (from its recording or archive file)."""
    with _api(url, key) as api:
        out = _api_call(lambda: api.clip(source, start, end, output, exact=exact))
    click.echo(f"wrote {out['path']} ({out['bytes']} bytes), covering {out['start']:.3f} - {out['end']:.3f} s")
