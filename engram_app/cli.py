"""The command line: ``python -m engram_app COMMAND``.

Every command takes the same settings options (``--home``, ``--model``, ``--device``) and calls
the service; problems a user can fix are printed as one line, without a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from engram_app.errors import EngramError
from engram_app.settings import DEFAULT_HOST, DEFAULT_PORT, DEVICE_CHOICES, Settings, default_home


def settings_options(command: Callable) -> Callable:
    """Add --home/--model/--device to a command and pass it a ready :class:`Settings`."""

    @click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Data root (default: $ENGRAM_HOME, else the repository's storage/).",
    )
    @click.option(
        "--model",
        default=None,
        help="Base model: a Hugging Face id, a model folder or a .gguf file (default: bundled SmolLM2-135M-Instruct).",
    )
    @click.option(
        "--device",
        type=click.Choice(DEVICE_CHOICES),
        default="auto",
        show_default=True,
        help="auto: CUDA with bf16 when a GPU is present, else CPU with fp32.",
    )
    @click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
    @functools.wraps(command)
    def wrapper(home: Path | None, model: str | None, device: str, verbose: bool, **kwargs):
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            settings = Settings(home=home or default_home(), model=model, device=device)
            return command(settings=settings, **kwargs)
        except EngramError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=None, version=__import__("engram_app").__version__)
def cli() -> None:
    """Engram Studio: give a language model a memory of its user."""


@cli.command()
@settings_options
@click.argument("message")
@click.option("--json", "as_json", is_flag=True, help='Print {"reply": ..., "tokens": [{"text", "id"}, ...]}.')
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 for greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (temperature > 0).")
def chat(settings: Settings, message: str, as_json: bool, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """Answer MESSAGE with the model (streamed to the terminal unless --json)."""
    from engram_app.inference import GenerationOptions
    from engram_app.service import Service

    service = Service(settings)
    options = GenerationOptions(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if as_json:
        result = service.chat(message, options=options)
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))
        return
    for token in service.stream_chat([], message, options):
        click.echo(token.delta, nl=False)
        sys.stdout.flush()
    click.echo()


@cli.command()
@settings_options
def prepare(settings: Settings) -> None:
    """Prepare the base model (convert a GGUF once) and print how long loading took."""
    from engram_app.service import Service

    service = Service(settings)
    runtime = service.load()
    status = service.status()
    click.echo(f"Model {status['model']} ready on {status['device']}: loaded in {status['load_seconds']:.2f} s")
    click.echo(f"Files: {runtime.loaded.path or runtime.loaded.source.location}")


@cli.command()
@settings_options
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Interface to bind; anything but 127.0.0.1 exposes the app.")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
def serve(settings: Settings, host: str, port: int) -> None:
    """Start the web app (the same as running app.py)."""
    from engram_app.ui import launch

    settings.host, settings.port = host, port
    launch(settings)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="python -m engram_app")
