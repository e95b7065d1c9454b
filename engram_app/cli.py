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

from engram_app import __version__
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
@click.version_option(version=__version__)
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


# --- the memory library ----------------------------------------------------------------------


@cli.command()
@settings_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["auto", "document", "chat", "profile"]), default="auto", show_default=True,
              help="Force how the files are read (auto: recognised from their content).")
@click.option("--collection", default="default", show_default=True, help="Collection the sources join.")
@click.option("--max-size", type=float, default=50, show_default=True, help="Largest file to import, in MB.")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [{"path", "status", "reason", "source", ...}]}.')
def ingest(settings: Settings, paths: tuple[Path, ...], kind: str, collection: str, max_size: float, as_json: bool) -> None:
    """Import files and folders (recursively) into the library.

    Each file is reported as added, duplicate or failed (with the reason).
    """
    from engram_app.service import Service

    settings.max_upload_bytes = int(max_size * 2**20)
    service = Service(settings)

    def report(count: int, result) -> None:
        if as_json:
            return
        detail = {
            "added": f"{result.kind}/{result.format}, {result.records} records, {result.chunks} chunks (source {result.source})",
            "duplicate": f"already imported as source {result.source}",
            "failed": result.reason,
        }[result.status]
        click.echo(f"{result.status:9} {result.path}: {detail}")

    results = service.ingest(list(paths), kind=kind, collection=collection, progress=report)
    counts = {s: sum(r.status == s for r in results) for s in ("added", "duplicate", "failed")}
    if as_json:
        click.echo(json.dumps({"results": [r.to_json() for r in results], **counts}, ensure_ascii=False))
    else:
        click.echo(f"{counts['added']} added, {counts['duplicate']} duplicate, {counts['failed']} failed")


@cli.command()
@settings_options
@click.option("--collection", default=None, help="Only this collection.")
@click.option("--status", type=click.Choice(["ready", "failed", "deleted", "all"]), default="ready", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sources(settings: Settings, collection: str | None, status: str, as_json: bool) -> None:
    """List the sources in the library."""
    from engram_app.service import Service

    rows = Service(settings).sources(collection=collection, status=None if status == "all" else status)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for row in rows:
        what = row["error"] if row["status"] == "failed" else f"{row['kind']}/{row['format']}, {row['chunks']} chunks"
        click.echo(f"{row['id']:>5}  {row['status']:8} {row['collection']:12} {row['title'] or row['filename']}  ({what})")
    click.echo(f"{len(rows)} sources")


@cli.command()
@settings_options
@click.argument("source", type=int)
@click.option("--json", "as_json", is_flag=True)
def show(settings: Settings, source: int, as_json: bool) -> None:
    """Show one source: its details and its text."""
    from engram_app.service import Service

    data = Service(settings).show_source(source)
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    click.echo(f"Source {data['id']}: {data['title']} [{data['kind']}/{data['format']}, {data['status']}, "
               f"collection {data['collection']}, {data['size']} bytes, {data['chunks']} chunks]")
    for record in data["records_list"]:
        who = record["speaker"] or record["person"]
        click.echo(f"{who}: {record['text']}" if who else record["text"])


@cli.command()
@settings_options
@click.argument("query")
@click.option("-k", "--top", "k", type=int, default=5, show_default=True, help="How many chunks to return.")
@click.option("--collection", default=None)
@click.option("--json", "as_json", is_flag=True)
def search(settings: Settings, query: str, k: int, collection: str | None, as_json: bool) -> None:
    """Find the passages of the library closest in meaning to QUERY."""
    from engram_app.service import Service

    hits = Service(settings).search(query, k=k, collection=collection)
    if as_json:
        click.echo(json.dumps(hits, ensure_ascii=False))
        return
    for hit in hits:
        click.echo(f"[{hit['score']:.3f}] source {hit['source']} ({hit['title']}):\n  {hit['text'][:300]}")


@cli.command()
@settings_options
@click.argument("source", type=int)
def delete(settings: Settings, source: int) -> None:
    """Delete a source: its text, chunks, embeddings and original file are removed."""
    from engram_app.service import Service

    data = Service(settings).delete_source(source)
    click.echo(f"Deleted source {data['id']} ({data['title']}).")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="python -m engram_app")
