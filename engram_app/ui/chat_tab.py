"""The chat view: a conversation with the model, streamed token by token."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions, Message
from engram_app.service import Service


def _text(content) -> str:
    """The text of a Gradio chat message (a string, or a list of {"type": "text", ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    return "".join(_text(part) for part in content or [])


def to_messages(history: list[dict]) -> list[Message]:
    return [Message(turn["role"], _text(turn["content"])) for turn in history if turn["role"] in ("user", "assistant", "system")]


def build_chat_tab(service: Service) -> None:
    chatbot = gr.Chatbot(
        label="Conversation",
        elem_id="chat",
        height=460,
        buttons=["copy"],
        feedback_options=None,
        placeholder="Ask the model anything. Replies stream in as they are generated.",
    )
    with gr.Row():
        message = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            elem_id="chat-input",
            scale=8,
            autofocus=True,
            max_lines=8,
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("New chat", scale=1, elem_id="chat-clear")
    with gr.Accordion("Generation options", open=False):
        with gr.Row():
            max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Maximum new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")

    def respond(text: str, history: list[dict], max_new: float, temp: float, p: float) -> Iterator[tuple[str, list[dict]]]:
        text = (text or "").strip()
        if not text:
            yield "", history
            return
        earlier = to_messages(history)
        history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield "", history
        try:
            options = GenerationOptions(max_new_tokens=int(max_new), temperature=float(temp), top_p=float(p))
            reply = ""
            for token in service.stream_chat(earlier, text, options):
                if token.delta:
                    reply += token.delta
                    history[-1] = {"role": "assistant", "content": reply}
                    yield "", history
        except EngramError as exc:
            raise gr.Error(str(exc)) from None

    inputs = [message, chatbot, max_tokens, temperature, top_p]
    message.submit(respond, inputs, [message, chatbot], api_name="chat")
    send.click(respond, inputs, [message, chatbot], api_visibility="private")
    clear.click(lambda: ("", []), None, [message, chatbot], api_visibility="private")
