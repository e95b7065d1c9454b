"""What a user did wrong (or what the service refused) is shown in the page, not as a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import gradio as gr

from engram_app.errors import EngramError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the service's :class:`EngramError` (a message meant for the user) into a Gradio error popup."""
    try:
        yield
    except EngramError as exc:
        raise gr.Error(str(exc)) from None
