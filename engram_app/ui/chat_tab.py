"""The chat view: conversations with the model wearing a memory pack (or not), streamed token by token.

Every turn is kept in SQLite (the conversation list reopens it); a reply generated with a memory
carries its trace, which the Inspect view shows. The compare view answers one message three
ways: memory on, memory off, and retrieval (library passages in the prompt).
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.ui.errors import user_errors

BASE = "base model (no memory)"
EMPTY_REPLY = "(the model ended its reply without writing anything)"


def pack_choices(service: Service) -> list[str]:
    return [BASE, *(p["name"] for p in service.packs())]


def conversation_choices(service: Service) -> list[tuple[str, int]]:
    out = []
    for c in service.conversations(limit=100):
        pack = f" [{c['pack']}]" if c["pack"] else ""
        out.append((f"#{c['id']} {c['title'][:60]}{pack} ({c['messages']} messages)", c["id"]))
    return out


def history_of(service: Service, conversation: int) -> list[dict]:
    return [{"role": t["role"], "content": t["content"]} for t in service.conversation(conversation)
            if t["role"] in ("user", "assistant")]


def build_chat_tab(service: Service):
    conversation = gr.State(None)  # the open conversation's id (None: the next message starts one)
    last_reply = gr.State(None)  # the id of the last reply with a memory trace (for Inspect)
    with gr.Row():
        pack = gr.Dropdown([BASE], value=BASE, label="Memory pack", elem_id="chat-pack", scale=2,
                           info="The model wears this pack's active version.")
        memory = gr.Checkbox(value=True, label="Memory on", elem_id="chat-memory", scale=1,
                             info="Off: the same pack's base model, no memory.")
        retrieval = gr.Slider(0, 8, value=0, step=1, label="Retrieval: library passages in the prompt",
                              elem_id="chat-retrieval", scale=2)
        conversations = gr.Dropdown([], value=None, label="Conversations", elem_id="chat-conversations", scale=3,
                                    info="Reopen an earlier conversation.")
    chatbot = gr.Chatbot(
        label="Conversation",
        elem_id="chat",
        height=420,
        buttons=["copy"],
        feedback_options=None,
        placeholder="Ask the model anything. Replies stream in as they are generated.",
    )
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="chat-input",
                             scale=8, autofocus=True, max_lines=8)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("New chat", scale=1, elem_id="chat-clear")
        inspect = gr.Button("Inspect last reply", scale=1, elem_id="chat-inspect", interactive=False)
        unload = gr.Button("Unload pack", scale=1, elem_id="chat-unload", size="sm")
    retrieved = gr.Dataframe(headers=["score", "source", "passage"], value=[], label="Passages put in the prompt",
                             interactive=False, visible=False, elem_id="chat-retrieved", wrap=True)
    with gr.Accordion("Generation options", open=False):
        with gr.Row():
            max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Maximum new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
    with gr.Accordion("Compare: memory on, memory off, retrieval", open=False, elem_id="compare-box"):
        with gr.Row():
            compare_message = gr.Textbox(placeholder="A question to answer three ways", show_label=False,
                                         elem_id="compare-input", scale=8)
            compare = gr.Button("Compare", variant="primary", elem_id="compare-run", scale=1)
        compare_k = gr.Slider(1, 8, value=3, step=1, label="Passages for the retrieval answer")
        with gr.Row():
            answer_on = gr.Textbox(label="Memory on", lines=6, interactive=False, elem_id="compare-on")
            answer_off = gr.Textbox(label="Memory off", lines=6, interactive=False, elem_id="compare-off")
            answer_rag = gr.Textbox(label="Retrieval, memory off", lines=6, interactive=False, elem_id="compare-rag")

    def chosen(p: str | None) -> str | None:
        return None if not p or p == BASE else p

    def respond(text, history, conv, p, mem, k, max_new, temp, top) -> Iterator[tuple]:
        text = (text or "").strip()
        if not text:
            yield "", history, conv, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield "", history, conv, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        with user_errors():
            options = GenerationOptions(max_new_tokens=int(max_new), temperature=float(temp), top_p=float(top))
            stream = service.chat_stream(text, options=options, pack=chosen(p), memory=bool(mem),
                                         retrieval=int(k), conversation=conv)
            reply = ""
            for token in stream:
                if token.delta:
                    reply += token.delta
                    history[-1] = {"role": "assistant", "content": reply}
                    yield "", history, conv, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        result = stream.result
        if not result.reply.strip():
            history[-1] = {"role": "assistant", "content": EMPTY_REPLY}
        passages = [[f"{h['score']:.2f}", f"{h['title']} (source {h['source']})", h["text"][:400]]
                    for h in result.retrieved]
        traced = result.message_id if result.traces else None
        yield ("", history, result.conversation_id, traced, gr.update(interactive=traced is not None),
               gr.update(value=passages, visible=bool(passages)),
               gr.update(choices=conversation_choices(service), value=result.conversation_id))

    def open_conversation(conv: int | None):
        if conv is None:
            return gr.skip(), gr.skip()
        with user_errors():
            return history_of(service, int(conv)), int(conv)

    def run_compare(text: str, p: str | None, k: float, max_new: float) -> Iterator[tuple[str, str, str]]:
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a question to compare.")
        if chosen(p) is None:
            raise gr.Error("Choose a memory pack first: the comparison is with and without its memory.")
        options = GenerationOptions(max_new_tokens=int(max_new))
        answers = ["", "", ""]
        runs = [dict(memory=True, retrieval=0), dict(memory=False, retrieval=0), dict(memory=False, retrieval=int(k))]
        with user_errors():
            for i, run in enumerate(runs):
                answers[i] = "..."
                yield tuple(answers)
                answers[i] = ""
                for token in service.chat_stream(text, options=options, pack=chosen(p), save=False, **run):
                    answers[i] += token.delta
                    yield tuple(answers)
                if not answers[i].strip():
                    answers[i] = EMPTY_REPLY
                    yield tuple(answers)

    def unload_pack(p: str | None) -> None:
        """Free the chosen pack's adapters on the shared base model (its next chat loads them again)."""
        if chosen(p) is None:
            raise gr.Error("Choose a memory pack to unload.")
        with user_errors():
            info = service.unload_pack(chosen(p))
        gr.Info(f"Unloaded pack {info['pack']}: {info['freed_bytes'] / 2**20:.1f} MB freed." if info["unloaded"]
                else f"Pack {info['pack']} was not loaded.")

    unload.click(unload_pack, [pack], None, api_name="unload_pack")

    inputs = [message, chatbot, conversation, pack, memory, retrieval, max_tokens, temperature, top_p]
    outputs = [message, chatbot, conversation, last_reply, inspect, retrieved, conversations]
    message.submit(respond, inputs, outputs, api_name="chat")
    send.click(respond, inputs, outputs, api_visibility="private")
    clear.click(lambda: ("", [], None, None, gr.update(interactive=False), gr.update(value=None)), None,
                [message, chatbot, conversation, last_reply, inspect, conversations], api_visibility="private")
    conversations.input(open_conversation, conversations, [chatbot, conversation], api_visibility="private")
    compare.click(run_compare, [compare_message, pack, compare_k, max_tokens], [answer_on, answer_off, answer_rag],
                  api_name="compare")

    def refresh(p: str | None):
        choices = pack_choices(service)
        return (gr.update(choices=choices, value=p if p in choices else BASE),
                gr.update(choices=conversation_choices(service)))

    return refresh, pack, conversations, inspect, last_reply
