"""The Gradio web app. It holds no logic of its own: every action calls the service."""

from __future__ import annotations

import os

# Before gradio is imported anywhere: no telemetry, ever.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from engram_app.ui.app import build_app, launch  # noqa: E402

__all__ = ["build_app", "launch"]
