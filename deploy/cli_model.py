"""The model commands of the `tubescope` CLI: init-tiny, pull, sizes and configs (registered on deploy.cli's group
when it is imported)."""
from __future__ import annotations

from pathlib import Path

import click

from deploy.cli import cli, current_settings


@cli.group("model")
def model_group() -> None:
    """Model checkpoints."""


@model_group.command("init-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def model_init_tiny(directory: Path) -> None:
    """Write a tiny random Qwen2-VL checkpoint (Hugging Face layout) into DIRECTORY."""
    from qwen2vl.checkpoint import write_tiny_checkpoint

    out = write_tiny_checkpoint(directory)
    click.echo(f"wrote a tiny random Qwen2-VL checkpoint to {Path(out).resolve()}")


@model_group.command("pull")
@click.argument("repo_id")
@click.option("--revision", default=None, help="a branch, tag or commit (default: the repo's main branch)")
@click.pass_context
def model_pull(ctx: click.Context, repo_id: str, revision: str | None) -> None:
    """Download a checkpoint from the Hugging Face hub (REPO_ID like Qwen/Qwen2-VL-2B-Instruct) into the data dir's
    hub cache; resumes a partial download; prints the checkpoint folder. Set model_path to REPO_ID (or the folder)
    to serve it. The hub client honours HF_ENDPOINT (a mirror) and HF_TOKEN."""
    from pipeline.model_hub import CheckpointMissing, hub_cache, pull

    settings = current_settings(ctx)
    try:
        path = pull(repo_id, hub_cache(settings.data_dir), revision=revision)
    except (CheckpointMissing, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:              # the hub client's errors: not found, gated, no connection
        raise click.ClickException(f"could not download {repo_id}: {type(e).__name__}: {e}") from None
    click.echo(path)


@model_group.command("sizes")
@click.option("--prompt-tokens", type=int, default=None,
              help="tokens of one question's prompt (default: ask_token_budget + 64)")
@click.option("--answer-tokens", type=int, default=None, help="tokens of one answer (default: api_max_new_tokens)")
@click.option("--gpu-memory-gib", type=click.FloatRange(min=1), default=80.0, show_default=True,
              help="memory of one GPU, for the GPUs each decoder replica needs")
@click.pass_context
def model_sizes(ctx: click.Context, prompt_tokens: int | None, answer_tokens: int | None,
                gpu_memory_gib: float) -> None:
    """GPU memory of the released sizes (2B, 7B, 72B) in bf16 and fp32: weights of a decoder replica and of an
    encoder actor, KV cache per 1,000 cached visual tokens, and per concurrent question (a markdown table); then
    how many GPUs of --gpu-memory-gib a decoder replica splits its layers over (decoder_gpus)."""
    from qwen2vl.sizes import gpu_table, markdown_table, serving_table

    settings = current_settings(ctx)
    click.echo(markdown_table(serving_table(prompt_tokens or settings.ask_token_budget + 64,
                                            answer_tokens or settings.api_max_new_tokens)))
    click.echo(gpu_table(gpu_memory_gib), nl=False)


@model_group.command("configs")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder to write into (default: deploy/sizes of this checkout)")
def model_configs(out: Path | None) -> None:
    """Write the Serve and KubeRay configs of each released size (deploy/sizes/<size>/serve.yaml and
    rayservice.yaml), made from deploy/serve.yaml and deploy/kuberay/rayservice.yaml."""
    from deploy.size_configs import SIZES_DIR, write_all

    for path in write_all(out or SIZES_DIR):
        click.echo(path)
