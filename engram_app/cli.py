"""The command line: ``python -m engram_app COMMAND``.

Every command takes the same settings options (``--home``, ``--model``, ``--device``) and calls
the service; problems a user can fix are printed as one line, without a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from engram_app import __version__
from engram_app.errors import EngramError
from engram_app.ingest import KINDS
from engram_app.settings import DEFAULT_HOST, DEFAULT_PORT, DEVICE_CHOICES, Settings, default_home


class LazyChoice(click.Choice):
    """A :class:`click.Choice` whose values are read when a command first needs them.

    The size presets and pack modes are defined in ``engram_app.training``, whose import takes
    seconds (torch, transformers, peft): ``--help`` and the commands that never read them do not
    wait for it.
    """

    def __init__(self, load: Callable[[], Iterable[str]]):
        self._load = load  # not click.Choice.__init__: it would read the values now
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())


def preset_names() -> list[str]:
    from engram_app.training.sizes import PRESETS

    return list(PRESETS)


def pack_modes() -> tuple[str, ...]:
    from engram_app.training.packs import MODES

    return MODES


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
@click.option("--pack", default=None, help="Answer with this memory pack's active version.")
@click.option("--no-memory", is_flag=True, help="With --pack: answer with the pack's base model, memory off.")
@click.option("--retrieval", type=int, default=0, show_default=True,
              help="Put the K library lines closest to the message into the system message.")
@click.option("--conversation", type=int, default=None, help="Continue this conversation (its earlier turns).")
@click.option("-c", "--continue", "continue_last", is_flag=True, help="Continue the last conversation.")
@click.option("--remember", is_flag=True,
              help="After the reply, save the whole conversation so far to memory (a chat source of the library).")
@click.option("--collection", default="default", show_default=True, help="With --remember: the collection it joins.")
def chat(settings: Settings, message: str, as_json: bool, max_tokens: int, temperature: float, top_p: float,
         seed: int | None, pack: str | None, no_memory: bool, retrieval: int, conversation: int | None,
         continue_last: bool, remember: bool, collection: str) -> None:
    """Answer MESSAGE with the model (streamed to the terminal unless --json); every turn is kept
    (`conversations` lists them)."""
    from engram_app.inference import GenerationOptions
    from engram_app.service import Service

    if continue_last and conversation is not None:
        raise click.UsageError("Give --conversation ID or -c (the last conversation), not both.")
    service = Service(settings)
    if continue_last:
        last = service.conversations(limit=1)
        if not last:
            raise click.ClickException("There is no conversation to continue yet: chat without -c first.")
        conversation = last[0]["id"]
    options = GenerationOptions(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if as_json:
        result = service.chat(message, options=options, pack=pack, memory=not no_memory, retrieval=retrieval,
                              conversation=conversation)
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        stream = service.chat_stream(message, options=options, pack=pack, memory=not no_memory,
                                     retrieval=retrieval, conversation=conversation, save=True)
        for token in stream:
            click.echo(token.delta, nl=False)
            sys.stdout.flush()
        click.echo()
        result = stream.result
        if retrieval or conversation is not None:
            click.echo(f"(conversation {result.conversation_id})", err=True)
    if remember:
        saved = service.remember_conversation(result.conversation_id, collection)
        what = "saved to memory as" if saved.status == "added" else "already in memory as"
        click.echo(f"(conversation {result.conversation_id} {what} source {saved.source})", err=True)


@cli.command()
@settings_options
@click.argument("text", required=False)
@click.option("--pack", "pack_name", required=True, help="The pack whose memory to look into (its active version).")
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON file of token ids: a list, or an object with \"ids\" (what `chat --json` prints).")
@click.option("--effect", is_flag=True, help="Add each token's memory effect (log-probability on minus off).")
@click.option("--sources", is_flag=True, help="Add, for each slot, the sources and n-grams that wrote it.")
@click.option("--json", "as_json", is_flag=True)
def inspect(settings: Settings, text: str | None, pack_name: str, ids_file: Path | None, effect: bool, sources: bool,
            as_json: bool) -> None:
    """Which memory slots every token of TEXT (or --ids) reads, how strongly, and who wrote them."""
    from engram_app.service import Service

    if (text is None) == (ids_file is None):
        raise click.UsageError("Give either TEXT or --ids FILE.")
    ids = None
    if ids_file is not None:
        try:
            data = json.loads(ids_file.read_text())
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"Cannot read token ids from {ids_file}: {exc}") from None
        ids = data.get("ids") if isinstance(data, dict) else data
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise click.ClickException(f"{ids_file} must hold a list of token ids (or an object with \"ids\").")
    report = Service(settings).inspect_report(pack_name, text=text, ids=ids, effect=effect, sources=sources)
    tokens = report["tokens"]
    if as_json:
        click.echo(json.dumps({"tokens": tokens}, ensure_ascii=False))
        return
    for t in tokens:
        gates = " ".join(f"L{m['layer']} gate {m['gate']:.2f} |Y|/|h| {m['ratio']:.2f}" for m in t["memory"])
        extra = f"  effect {t['effect']['effect']:+.2f}" if "effect" in t else ""
        click.echo(f"{t['text']!r:>16}  {gates}{extra}")


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
@click.option("--password", envvar="ENGRAM_PASSWORD", default=None, show_envvar=True,
              help="Ask for this password (any user name) before showing the app: set it when --host exposes the "
                   "app on a network. Prefer the environment variable (a command line is visible to other users).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, envvar="ENGRAM_ALLOWED_HOSTS", show_envvar=True,
              help="A host name the app answers to besides its address and localhost (repeatable; the variable takes "
                   "several, comma separated). Requests for any other name are refused (DNS rebinding).")
def serve(settings: Settings, host: str, port: int, password: str | None, allowed_hosts: tuple[str, ...]) -> None:
    """Start the web app (the same as running app.py)."""
    from engram_app.settings import allowed_host_names
    from engram_app.ui import launch

    settings.host, settings.port, settings.password = host, port, password or None
    settings.allowed_hosts = allowed_host_names(allowed_hosts)
    launch(settings)


# --- the memory library ----------------------------------------------------------------------


@cli.command()
@settings_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["auto", *KINDS]), default="auto", show_default=True,
              help="Force how the files are read (auto: recognised from their content).")
@click.option("--collection", default="default", show_default=True, help="Collection the sources join.")
@click.option("--max-size", type=float, default=50, show_default=True, help="Largest file to import, in MB.")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [{"path", "status", "reason", "source", ...}]}.')
def ingest(settings: Settings, paths: tuple[Path, ...], kind: str, collection: str, max_size: float, as_json: bool) -> None:
    """Import files and folders (recursively) into the library.

    Each file is reported as added, duplicate or failed (with the reason).
    """
    from engram_app import cli_progress
    from engram_app.service import Service

    settings.max_upload_bytes = int(max_size * 2**20)
    service = Service(settings)
    bar = cli_progress.ImportBar(paths) if not as_json and cli_progress.stderr_is_terminal() else None
    echo = bar.write if bar else click.echo

    def report(count: int, result) -> None:
        if as_json:
            return
        if bar:
            bar.advance(result)
        detail = {
            "added": f"{result.kind}/{result.format}, {result.records} records, {result.chunks} chunks (source {result.source})",
            "duplicate": f"already imported as source {result.source}",
            "failed": result.reason,
        }[result.status]
        echo(f"{result.status:9} {result.path}: {detail}")
        for warning in result.warnings:  # under its file's line
            echo(f"{'':9} warning: {warning}")

    try:
        results = service.ingest(list(paths), kind=kind, collection=collection, progress=report)
    finally:
        if bar:
            bar.close()
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


@cli.command()
@settings_options
@click.argument("text")
@click.option("--collection", default="default", show_default=True, help="Collection the source joins.")
@click.option("--train", "then_train", is_flag=True,
              help="Then queue a training job for every pack that learns from the collection.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"result": {the ingest result}, "jobs": [{the job}, ...]}.')
def remember(settings: Settings, text: str, collection: str, then_train: bool, as_json: bool) -> None:
    """Add TEXT, a fact or a note, to the library as a source of its own.

    First-person statements ("My dog is called Pixel. I live in Porto." on lines of their own)
    become facts, as in a profile; any other text a short document.
    """
    from engram_app.service import Service

    service = Service(settings)
    result = service.remember(text, collection)
    jobs = service.train_collection(collection) if then_train and result.status == "added" else []
    if as_json:
        click.echo(json.dumps({"result": result.to_json(), "jobs": jobs}, ensure_ascii=False))
        return
    if result.status == "added":
        click.echo(f"Remembered as source {result.source} ({result.kind}, {result.records} records) "
                   f"in collection {collection}.")
    else:
        click.echo(f"Already remembered: source {result.source}.")
    for job in jobs:
        click.echo(f"Queued job {job['id']} for pack {job['pack']}: follow it with `job {job['id']}`.")
    if then_train and result.status == "added" and not jobs:
        click.echo(f"No pack learns from collection {collection}: create one with `pack create NAME`.")
    if then_train and result.status != "added":
        click.echo("Nothing new to train.")


@cli.command()
@settings_options
@click.option("--limit", type=int, default=50, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True,
              help='Print [{"id", "title", "created", "pack", "messages"}, ...], newest first.')
def conversations(settings: Settings, limit: int, as_json: bool) -> None:
    """List the conversations kept from chat (newest first); `chat -c` continues the last one."""
    from engram_app.service import Service

    rows = Service(settings).conversations(limit=limit)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for c in rows:
        pack = f" [{c['pack']}]" if c["pack"] else ""
        click.echo(f"{c['id']:>5}  {c['created']}  {c['messages']:>3} messages{pack}  {c['title']}")
    click.echo(f"{len(rows)} conversations")


@cli.group()
def conversation() -> None:
    """Rename, delete or export one conversation kept from chat (`conversations` lists them)."""


@conversation.command("rename")
@settings_options
@click.argument("conversation_id", type=int)
@click.argument("title")
def conversation_rename(settings: Settings, conversation_id: int, title: str) -> None:
    """Give conversation CONVERSATION_ID the title TITLE."""
    from engram_app.service import Service

    info = Service(settings).rename_conversation(conversation_id, title)
    click.echo(f"Conversation {info['id']} renamed: {info['title']}")


@conversation.command("delete")
@settings_options
@click.argument("conversation_id", type=int)
def conversation_delete(settings: Settings, conversation_id: int) -> None:
    """Delete a conversation with its messages and their memory traces."""
    from engram_app.service import Service

    info = Service(settings).delete_conversation(conversation_id)
    click.echo(f"Deleted conversation {info['id']} ({info['title']}) and its {info['messages']} messages.")


@conversation.command("export")
@settings_options
@click.argument("conversation_id", type=int)
@click.option("--format", "fmt", type=click.Choice(["json", "markdown"]), default="json", show_default=True,
              help='json: {"id", "title", "created", "pack", "messages": [{"role", "content", "pack", "version", '
                   '"created"}]}. markdown: each turn under its speaker.')
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The file to write (default: print it).")
def conversation_export(settings: Settings, conversation_id: int, fmt: str, output: Path | None) -> None:
    """Export a conversation's turns, in order, as JSON or Markdown."""
    from engram_app.service import Service

    text = Service(settings).export_conversation(conversation_id, fmt)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"Wrote {output}")


# --- memory packs and training ---------------------------------------------------------------


@cli.command()
@settings_options
@click.option("--json", "as_json", is_flag=True)
def packs(settings: Settings, as_json: bool) -> None:
    """List the memory packs with their versions."""
    from engram_app.service import Service

    rows = Service(settings).packs()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for p in rows:
        active = f"v{p['active_version']}" if p["active_version"] else "not trained"
        collections = ", ".join(p["collections"]) or "all collections"
        click.echo(f"{p['name']:16} {p['mode']:12} {p['preset']:7} {active:12} {len(p['versions'])} versions, "
                   f"base {p['base_model']}, learns from {collections}")
        if p["deleted_sources_learned"]:
            click.echo(f"  ! learned {len(p['deleted_sources_learned'])} source(s) deleted since: retrain without "
                       f"them with `train --pack {p['name']} --full`")
    click.echo(f"{len(rows)} packs")


@cli.group()
def pack() -> None:
    """Create and manage memory packs."""


@pack.command("create")
@settings_options
@click.argument("name")
@click.option("--size", type=LazyChoice(preset_names), default="medium",
              show_default=True, help="Size preset of the memory tables (see `pack sizes`: what each needs, and "
                                      "whether this machine can hold it).")
@click.option("--collections", multiple=True, help="Collections the pack learns from (repeat; default: all).")
@click.option("--mode", type=LazyChoice(pack_modes), default="engram", show_default=True,
              help="What trains: the Engram memory, a LoRA adapter, or both.")
@click.option("--json", "as_json", is_flag=True)
def pack_create(settings: Settings, name: str, size: str, collections: tuple[str, ...], mode: str, as_json: bool) -> None:
    """Create the memory pack NAME for the base model (--model, default the bundled one)."""
    from engram_app.service import Service

    info = Service(settings).create_pack(name, settings.model, size=size, collections=list(collections), mode=mode)
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
    else:
        click.echo(f"Created pack {info['name']} ({info['mode']}, {info['preset']}, base {info['base_model']}).")


@pack.command("migrate")
@settings_options
@click.argument("name")
@click.option("--name", "new_name", default=None, help="The new pack's name (default: NAME-on-<model>).")
@click.option("--size", type=LazyChoice(preset_names), default=None, help="Size preset (default: NAME's).")
@click.option("--mode", type=LazyChoice(pack_modes), default=None, help="What trains (default: NAME's).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (default: from the epochs).")
@click.option("--max-minutes", type=float, default=None, help="Stop after this many minutes of training.")
@click.option("--until-recalled/--no-until-recalled", default=True, show_default=True,
              help="Stop as soon as the facts are recalled (checked every 10 steps).")
@click.option("--wait", is_flag=True, help="Wait for the job and its comparison (starting a worker if none runs).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"pack", "job", "migration": {"from", "to", "sources", ..., "comparison"}}.')
def pack_migrate(settings: Settings, name: str, new_name: str | None, size: str | None, mode: str | None,
                 max_steps: int | None, max_minutes: float | None, until_recalled: bool, wait: bool,
                 as_json: bool) -> None:
    """Move pack NAME to the base model --model: a new pack learns the sources NAME learned (a training job),
    and its evaluation compares both packs' recall of the same facts."""
    from engram_app.service import Service
    from engram_app.training import TrainOptions
    from engram_app.training.migrate import comparison_text

    given = {"max_steps": max_steps, "max_minutes": max_minutes}
    options = TrainOptions(**{k: v for k, v in given.items() if v is not None}, until_recalled=until_recalled)
    service = Service(settings)
    moved = service.migrate_pack(name, settings.model, new_name, size, mode, options)
    new, job = moved["pack"]["name"], moved["job"]
    if wait:
        if not as_json:
            click.echo(f"Pack {new} created; waiting for job {job['id']} (Ctrl-C stops waiting, not the job).", err=True)
        job = service.job(service.wait(job["id"])["id"])
    if as_json:
        click.echo(json.dumps({"pack": service.pack(new), "job": job, "migration": service.migration(new)},
                              ensure_ascii=False))
    else:
        click.echo(f"Created pack {new} on {moved['pack']['base_model']} from {name}: job {job['id']} "
                   f"{job['status']} (follow it with `job {job['id']}`).")
        comparison = (service.migration(new) or {}).get("comparison")
        if comparison:
            click.echo(f"  {comparison_text(comparison)}")
    if wait and job["status"] == "failed":
        sys.exit(1)


@pack.command("export")
@settings_options
@click.argument("name")
@click.option("--version", "number", type=int, default=None, help="The version to export (default: the active one).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The file to write (default: <home>/exports/NAME-vN.zip).")
@click.option("--format", "fmt", type=click.Choice(["zip", "peft"]), default="zip", show_default=True,
              help="zip: one file for `pack import`. peft: a PEFT adapter folder DIR with a model card, for "
                   "PeftModel.from_pretrained or the Hugging Face Hub.")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
def pack_export(settings: Settings, name: str, number: int | None, output: Path | None, fmt: str,
                directory: Path | None) -> None:
    """Write a version of pack NAME as one .zip file (adapter weights and config; no sources), or with
    --format peft as the PEFT adapter folder DIRECTORY (default: <home>/exports/NAME-vN)."""
    from engram_app.service import Service

    if directory is not None and fmt != "peft":
        raise click.UsageError("DIRECTORY is for --format peft; a .zip goes where -o says.")
    click.echo(Service(settings).export_pack(name, directory or output, number, format=fmt))


@pack.command("import")
@settings_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="The new pack's name (default: the name in the file).")
@click.option("--json", "as_json", is_flag=True)
def pack_import(settings: Settings, file: Path, name: str | None, as_json: bool) -> None:
    """Import a pack file written by `pack export` as a new pack (checked against its base model)."""
    from engram_app.service import Service

    info = Service(settings).import_pack(file, name)
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
    else:
        click.echo(f"Imported pack {info['name']} ({info['mode']}, {info['preset']}, base {info['base_model']}) "
                   f"at version {info['active_version']}.")


@pack.command("unload")
@settings_options
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def pack_unload(settings: Settings, name: str, as_json: bool) -> None:
    """Free the adapters of pack NAME loaded on the shared base model (the next chat with it loads them again)."""
    from engram_app.service import Service

    info = Service(settings).unload_pack(name)
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"Unloaded {info['unloaded']} version(s) of pack {info['pack']} "
                   f"({info['freed_bytes'] / 2**20:.1f} MB freed).")


@pack.command("sizes")
@settings_options
@click.option("--json", "as_json", is_flag=True)
def pack_sizes(settings: Settings, as_json: bool) -> None:
    """The size presets, what each needs (RAM, disk, GPU) and whether this machine can hold it."""
    from engram_app.training.sizes import describe, summary

    rows = describe(settings.home)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(("  " if row["fits"] else "x ") + summary(row))


@cli.command()
@settings_options
@click.option("--pack", "pack_name", required=True, help="The pack to train.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (default: from --epochs).")
@click.option("--max-minutes", type=float, default=None, help="Stop after this many minutes of training.")
@click.option("--epochs", type=float, default=None, help="Passes over the examples (default 8).")
@click.option("--recall-epochs", type=float, default=None,
              help="With the recall check: passes allowed until the facts are recalled (default 24).")
@click.option("--lr", type=float, default=None, help="Learning rate of the dense parts (tables train at 5x).")
@click.option("--lr-final", type=float, default=None,
              help="The learning rate falls linearly to this fraction of --lr at the last step (default 0.1; 1: constant).")
@click.option("--batch-size", type=int, default=None)
@click.option("--full", is_flag=True, help="Retrain from scratch on every source (drops deleted sources' writes).")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation at the end.")
@click.option("--until-recalled/--no-until-recalled", default=True, show_default=True,
              help="Stop as soon as the facts of the pack's profiles are recalled (checked every 10 steps).")
@click.option("--wait", is_flag=True, help="Wait for the job to finish (starting a worker if none is running).")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON (at the end with --wait).")
def train(settings: Settings, pack_name: str, max_steps: int | None, max_minutes: float | None, epochs: float | None,
          recall_epochs: float | None, lr: float | None, lr_final: float | None, batch_size: int | None, full: bool,
          no_eval: bool, until_recalled: bool, wait: bool, as_json: bool) -> None:
    """Queue a training job for a pack: it learns the sources it has not learned yet."""
    from engram_app import cli_progress
    from engram_app.service import Service
    from engram_app.training import TrainOptions

    given = {"max_steps": max_steps, "max_minutes": max_minutes, "epochs": epochs, "recall_epochs": recall_epochs,
             "lr": lr, "lr_final": lr_final, "batch_size": batch_size}
    options = TrainOptions(**{k: v for k, v in given.items() if v is not None}, full=full, evaluate=not no_eval,
                           until_recalled=until_recalled)
    service = Service(settings)
    job = service.train(pack_name, options)
    if not wait:
        if as_json:
            click.echo(json.dumps(job, ensure_ascii=False))
        else:
            click.echo(f"Queued job {job['id']} for pack {pack_name}: follow it with `job {job['id']}`.")
        return
    if not as_json:
        click.echo(f"Job {job['id']} queued; waiting for it (Ctrl-C stops waiting, not the job).", err=True)
    seen = {"step": -1}
    bar = cli_progress.StepBar(job["id"]) if not as_json and cli_progress.stderr_is_terminal() else None

    def show(view: dict) -> None:
        if as_json or view["step"] == seen["step"] or not view["total_steps"]:
            return
        seen["step"] = view["step"]
        latest = service.job(view["id"])["latest"]
        if bar:
            bar.show(view["step"], view["total_steps"], latest)
            return
        loss = f" loss {latest['loss']:.3f}" if "loss" in latest else ""
        eta = f", {latest['eta']:.0f} s left" if latest.get("eta") is not None else ""
        click.echo(f"step {view['step']}/{view['total_steps']}{loss}{eta}", err=True)

    try:
        final = service.wait(job["id"], on_update=show)
    finally:
        if bar:
            bar.close()
    if as_json:
        click.echo(json.dumps(service.job(final["id"]), ensure_ascii=False))
    else:
        _print_job(service.job(final["id"]))
    if final["status"] == "failed":
        sys.exit(1)


def _print_job(job: dict) -> None:
    total = job["total_steps"] or "?"
    click.echo(f"Job {job['id']} ({job['pack']}): {job['status']}, step {job['step']}/{total}")
    if job["error"]:
        click.echo(f"  error: {job['error']}")
    result = job["result"] or {}
    if result.get("version"):
        click.echo(f"  wrote version {result['version']}")
    evaluation = result.get("evaluation") or {}
    if "memorisation" in evaluation:
        m, r = evaluation["memorisation"], evaluation["retention"]
        click.echo(f"  memorisation loss {m['before']} -> {m['after']}; retention loss {r['base']} -> {r['after']} "
                   f"(cost {r['cost']})")
    if "recall" in evaluation:
        rec = evaluation["recall"]
        click.echo(f"  recall on {rec['probes']} probes: memory on {rec['memory_on']['recall']}, "
                   f"off {rec['memory_off']['recall']}")
    for line in job.get("log", [])[-5:]:
        click.echo(f"  | {line['message']}")


@cli.command()
@settings_options
@click.option("--json", "as_json", is_flag=True)
def jobs(settings: Settings, as_json: bool) -> None:
    """List training jobs, newest first."""
    from engram_app.service import Service

    rows = Service(settings).jobs()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for j in rows:
        click.echo(f"{j['id']:>5}  {j['pack']:16} {j['status']:11} step {j['step']}/{j['total_steps'] or '?'}  "
                   f"{j['created']}")
    click.echo(f"{len(rows)} jobs")


@cli.command()
@settings_options
@click.argument("job_id", type=int)
@click.option("--metrics", is_flag=True, help="Include every step's metrics (with --json).")
@click.option("--json", "as_json", is_flag=True)
def job(settings: Settings, job_id: int, metrics: bool, as_json: bool) -> None:
    """Show one job: status, progress, evaluation and the tail of its log."""
    from engram_app.service import Service

    view = Service(settings).job(job_id, metrics=metrics)
    if as_json:
        click.echo(json.dumps(view, ensure_ascii=False))
    else:
        _print_job(view)


@cli.command()
@settings_options
@click.argument("job_id", type=int)
def cancel(settings: Settings, job_id: int) -> None:
    """Cancel a job: it stops at its next step and keeps what it learned as a version."""
    from engram_app.service import Service

    view = Service(settings).cancel(job_id)
    click.echo(f"Job {job_id}: {view['status']}" + (" (stopping at the next step)" if view["status"] == "running" else ""))


@cli.command()
@settings_options
@click.argument("name")
@click.argument("version", type=int)
def rollback(settings: Settings, name: str, version: int) -> None:
    """Make VERSION the active version of pack NAME (versions are never deleted)."""
    from engram_app.service import Service

    info = Service(settings).rollback(name, version)
    click.echo(f"Pack {name} now uses version {info['active_version']}.")


@cli.command("eval")
@settings_options
@click.option("--pack", "pack_name", required=True)
@click.option("--probes", "probes_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSON lines of {"prompt": ..., "answer": ...}; the prompt is a user message.')
@click.option("--json", "as_json", is_flag=True)
def eval_command(settings: Settings, pack_name: str, probes_file: Path, as_json: bool) -> None:
    """Ask each probe with memory on and off: does the greedy reply contain the answer?"""
    from engram_app.service import Service
    from engram_app.training.evaluate import read_probes

    probes = read_probes(probes_file)
    report = Service(settings).evaluate(pack_name, probes)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    for p in report["probes"]:
        on, off = p["memory_on"], p["memory_off"]
        click.echo(f"{p['prompt']}  [answer: {p['answer']}]\n  on  {'+' if on['contains_answer'] else '-'} "
                   f"{on['logprob']:7.3f}  {on['reply'][:100]}\n  off {'+' if off['contains_answer'] else '-'} "
                   f"{off['logprob']:7.3f}  {off['reply'][:100]}")
    s = report["summary"]
    click.echo(f"recall: memory on {s['memory_on']['recall']}, off {s['memory_off']['recall']}; mean logprob: on "
               f"{s['memory_on']['mean_logprob']}, off {s['memory_off']['mean_logprob']}")


@cli.command()
@settings_options
@click.option("--idle-exit", type=float, default=None, help="Exit after this many seconds without a job.")
@click.option("--lock-fd", type=int, default=None, hidden=True)
@click.option("--alive-fd", type=int, default=None, hidden=True)
def worker(settings: Settings, idle_exit: float | None, lock_fd: int | None, alive_fd: int | None) -> None:
    """Run the training worker in the foreground (the app starts one by itself)."""
    from engram_app.training.worker import Worker

    logging.getLogger().setLevel(logging.INFO)
    Worker(settings, idle_exit=idle_exit, lock_fd=lock_fd, alive_fd=alive_fd).run()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="python -m engram_app")
