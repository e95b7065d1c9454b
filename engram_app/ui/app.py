"""Assemble the Gradio app and launch it, local-only and offline by default."""

from __future__ import annotations

import hmac
import logging
from functools import partial
from pathlib import Path

import gradio as gr

from engram_app.openai_api import openai_router
from engram_app.service import Service
from engram_app.settings import DEFAULT_HOST, Settings
from engram_app.ui.chat_tab import build_chat_tab, refresh_chat_choices
from engram_app.ui.inspect_tab import InspectTab, build_inspect_tab, inspect_reply, refresh_inspect_choices
from engram_app.ui.library_tab import build_library_tab, conversation_rows, source_rows
from engram_app.ui.security import CACHE_CLEANUP, HostPolicy, guard_middleware, web_cache
from engram_app.ui.train_tab import build_train_tab, refresh_packs

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"

# System fonts only: the default theme would fetch web fonts from a CDN, and the app works offline.
THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)


def status_markdown(service: Service) -> str:
    """The status line: model, device (and GPU memory in use), and the training worker's state."""
    status = service.status()
    if status["device"] is None:
        return f"Model **{status['model']}** is loading..."
    line = f"Model **{status['model']}** on **{status['device']}**, loaded in {status['load_seconds']:.2f} s"
    if status.get("gpu_memory"):
        line += f" ({status['gpu_memory']} in use)"
    worker = service.worker()
    if not worker["alive"]:
        line += ". Training worker: stopped (starts when you train)."
    elif worker.get("job"):
        line += f". Training worker: running job {worker['job']}"
        line += f" ({status['chat_threads']})." if status.get("chat_threads") else "."
    else:
        line += f". Training worker: {worker['state'] or 'idle'}."
    return line


def open_in_inspect(service: Service, inspector: InspectTab, tabs: gr.Tabs, message_id: int | None) -> dict:
    """Chat's "Inspect last reply": switch to the Inspect tab, with that reply chosen and shown."""
    if message_id is None:
        raise gr.Error("The last reply has no memory trace (it was generated without a memory).")
    chosen = refresh_inspect_choices(service, inspector, None, message_id)[inspector.reply]
    return {tabs: gr.Tabs(selected="inspect-tab"), inspector.reply: chosen,
            **inspect_reply(service, inspector, message_id)}


def build_app(service: Service) -> gr.Blocks:
    # delete_cache: uploads and exported packs in Gradio's cache are removed once an hour old, and
    # all of them when the server stops.
    with gr.Blocks(title="Engram Studio", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as app:
        with gr.Row(elem_id="header"):
            gr.HTML(
                f'<div class="brand"><img src="/gradio_api/file={ASSETS / "logo.svg"}" alt="" width="36" height="36">'
                "<span>Engram Studio</span></div>",
            )
        status = gr.Markdown(elem_id="status")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat-tab") as chat_page:
                chat = build_chat_tab(service)
            with gr.Tab("Library", id="library-tab") as library_page:
                library = build_library_tab(service)
            with gr.Tab("Memory & training", id="train-tab"):
                train = build_train_tab(service)
            with gr.Tab("Inspect", id="inspect-tab") as inspect_page:
                inspector = build_inspect_tab(service)
        app.load(partial(status_markdown, service), None, status, api_visibility="private")
        gr.Timer(5.0).tick(partial(status_markdown, service), None, status, api_visibility="private",
                           show_progress="hidden")
        # What the page shows comes from the data root when it loads (and when a tab is opened), so a
        # reload, or a change made from the CLI, shows what is there now.
        app.load(partial(source_rows, service), [library.query, library.status], library.sources,
                 api_visibility="private")
        refresh_conversations = partial(conversation_rows, service)  # chats made since show when the tab opens
        app.load(refresh_conversations, None, library.conversations, api_visibility="private")
        library_page.select(refresh_conversations, None, library.conversations, api_visibility="private")
        app.load(partial(refresh_packs, service, train), train.pack, [train.packs_table, train.pack],
                 api_visibility="private")
        refresh_chat = partial(refresh_chat_choices, service, chat)
        app.load(refresh_chat, chat.pack, [chat.pack, chat.conversations], api_visibility="private")
        chat_page.select(refresh_chat, chat.pack, [chat.pack, chat.conversations], api_visibility="private")
        refresh_inspect = partial(refresh_inspect_choices, service, inspector)
        choices = [inspector.pack, inspector.reply]
        app.load(refresh_inspect, choices, choices, api_visibility="private")
        inspect_page.select(refresh_inspect, choices, choices, api_visibility="private")
        chat.inspect.click(partial(open_in_inspect, service, inspector, tabs), chat.last_reply,
                           [tabs, inspector.reply, *inspector.report_outputs], api_visibility="private")
    return app


def password_check(password: str):
    """Gradio's ``auth``: any user name, the password compared in constant time."""
    expected = password.encode()
    return lambda _user, given: hmac.compare_digest(given.encode(), expected)


def launch(settings: Settings, block: bool = True) -> gr.Blocks:
    """Load the model, then serve the app (blocking unless ``block`` is False: then ``close()`` it)."""
    service = Service(settings)
    runtime = service.load()
    log.info("Model ready in %.2f s.", runtime.loaded.load_seconds)
    print(f"Model {runtime.loaded.source.name} ready on {runtime.loaded.device.describe()}: "
          f"loaded in {runtime.loaded.load_seconds:.2f} s", flush=True)
    if service.resume_pending_jobs():
        print("Training jobs are waiting: started the worker to run them.", flush=True)
    if settings.host != DEFAULT_HOST:
        log.warning("Binding to %s: the app is reachable from other machines on that network.", settings.host)
        if not settings.password:
            print(f"Warning: the app listens on {settings.host} without a password: anyone on that network can read "
                  "your library and chat. Set ENGRAM_PASSWORD (or --password) to ask for one.", flush=True)
    auth = password_check(settings.password) if settings.password else None
    web_cache(settings)  # Gradio's uploads and downloads stay under the data root
    log.info("Answering to the host names %s (--allowed-host adds one).",
             ", ".join(sorted(HostPolicy.for_settings(settings).names)))
    app = build_app(service)
    app.queue(default_concurrency_limit=1).launch(
        server_name=settings.host,
        server_port=settings.port,
        theme=THEME,
        css_paths=[ASSETS / "style.css"],
        allowed_paths=[str(ASSETS)],
        run_history=False,
        footer_links=[],
        ssr_mode=False,
        show_error=True,
        # Pack files reach ~0.6 GB (the large preset); the library refuses files over its own limit
        # (Settings.max_upload_bytes, 50 MB) with a reason after the upload.
        max_file_size="1gb",
        favicon_path=ASSETS / "logo.svg",
        auth=auth,
        auth_message="Engram Studio asks for the password it was started with." if auth else None,
        # Refuses requests for foreign host names (DNS rebinding) and limits failed logins; /v1 is the
        # OpenAI-compatible API (engram_app/openai_api.py), its wrong API keys counted in the same limit.
        app_kwargs={"middleware": [guard := guard_middleware(settings)],
                    "routes": openai_router(service, guard.kwargs.get("limiter")).routes},
        # No static-file worker processes (GRADIO_NUM_WORKERS): every request goes through the guard.
        num_workers=0,
        prevent_thread_lock=not block,
    )
    return app
