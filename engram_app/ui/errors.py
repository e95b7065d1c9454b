"""What a user did wrong (or what the service refused) is shown in the page, not as a traceback."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator

import gradio as gr

from engram_app.errors import EngramError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the service's :class:`EngramError` (a message meant for the user) into a Gradio error popup.

    The popup renders its message as HTML, and a message may quote what a user typed or a file's
    name: it is escaped, so it shows as the text it is."""
    try:
        yield
    except EngramError as exc:
        raise gr.Error(html.escape(str(exc), quote=False)) from None
