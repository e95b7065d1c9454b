"""The chat view: conversations with the model wearing a memory pack (or not), streamed token by token.

Every turn is kept in SQLite (the conversation list reopens it); a reply generated with a memory
carries its trace, which the Inspect view shows. The compare view answers one message three
ways: memory on, memory off, and retrieval (the library lines nearest the question in the prompt).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import gradio as gr

from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.ui.errors import user_errors

BASE = "base model (no memory)"
EMPTY_REPLY = "(the model ended its reply without writing anything)"


@dataclass
class ChatTab:
    """The Chat tab's components, by name: its handlers write them, the app wires a few to other tabs."""

    conversation: gr.State  # the open conversation's id (None: the next message starts one)
    last_reply: gr.State  # the id of the last reply with a memory trace (for Inspect)
    pack: gr.Dropdown
    memory: gr.Checkbox
    retrieval: gr.Slider
    conversations: gr.Dropdown
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    clear: gr.Button
    inspect: gr.Button
    unload: gr.Button
    retrieved: gr.Dataframe
    max_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    compare_message: gr.Textbox
    compare: gr.Button
    compare_k: gr.Slider
    answer_on: gr.Textbox
    answer_off: gr.Textbox
    answer_rag: gr.Textbox
    remember: gr.Button  # "Save this conversation to memory"


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


def chosen_pack(choice: str | None) -> str | None:
    """The pack named in the dropdown, or None for the base model."""
    return None if not choice or choice == BASE else choice


def refresh_chat_choices(service: Service, tab: ChatTab, current_pack: str | None) -> dict:
    """The pack and conversation lists as they are now (the chosen pack kept while it exists)."""
    choices = pack_choices(service)
    return {tab.pack: gr.update(choices=choices, value=current_pack if current_pack in choices else BASE),
            tab.conversations: gr.update(choices=conversation_choices(service))}


def conversation_exists(service: Service, conversation: int) -> bool:
    """Whether a conversation is still kept (the Library tab can delete the one open here)."""
    try:
        service.conversation_info(conversation)
    except EngramError:
        return False
    return True


def send_message(service: Service, tab: ChatTab, text: str, history: list[dict], conversation: int | None,
                 pack: str | None, memory_on: bool, retrieval: float, max_new_tokens: float, temperature: float,
                 top_p: float) -> Iterator[dict]:
    """Answer ``text`` in the open conversation, streaming the reply into the chat as it is generated.

    Once done: the conversation kept, the reply's trace offered to Inspect, the retrieved passages
    shown (retrieval mode) and the conversation list refreshed."""
    text = (text or "").strip()
    typing = {tab.message: "", tab.chatbot: history, tab.conversation: conversation}
    if not text:
        yield typing
        return
    if conversation is not None and not conversation_exists(service, conversation):
        gr.Info(f"Conversation {conversation} was deleted (in the Library tab): this message starts a new one.")
        conversation, history = None, []
        typing = {**typing, tab.chatbot: history, tab.conversation: None}
    history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    yield {**typing, tab.chatbot: history}
    with user_errors():
        options = GenerationOptions(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                    top_p=float(top_p))
        stream = service.chat_stream(text, options=options, pack=chosen_pack(pack), memory=bool(memory_on),
                                     retrieval=int(retrieval), conversation=conversation)
        reply = ""
        for token in stream:
            if token.delta:
                reply += token.delta
                history[-1] = {"role": "assistant", "content": reply}
                yield {**typing, tab.chatbot: history}
    result = stream.result
    if not result.reply.strip():
        history[-1] = {"role": "assistant", "content": EMPTY_REPLY}
    passages = [[f"{h['score']:.2f}", f"{h['title']} (source {h['source']})", h["text"][:400]]
                for h in result.retrieved]
    traced = result.message_id if result.traces else None
    yield {tab.message: "", tab.chatbot: history, tab.conversation: result.conversation_id, tab.last_reply: traced,
           tab.inspect: gr.update(interactive=traced is not None),
           tab.retrieved: gr.update(value=passages, visible=bool(passages)),
           tab.conversations: gr.update(choices=conversation_choices(service), value=result.conversation_id)}


def start_new_chat(tab: ChatTab) -> dict:
    """The "New chat" button: an empty chat; the next message starts a new conversation."""
    return {tab.message: "", tab.chatbot: [], tab.conversation: None, tab.last_reply: None,
            tab.inspect: gr.update(interactive=False), tab.conversations: gr.update(value=None)}


def open_conversation(service: Service, tab: ChatTab, conversation: int | None) -> dict:
    """Reopen a conversation from the list: its turns in the chat, and the next message continues it."""
    if conversation is None:
        return gr.skip()
    with user_errors():
        return {tab.chatbot: history_of(service, int(conversation)), tab.conversation: int(conversation)}


def compare_answers(service: Service, tab: ChatTab, question: str, pack: str | None, retrieval: float,
                    max_new_tokens: float) -> Iterator[dict]:
    """Answer ``question`` three ways, one after the other, each streamed into its box: with the pack's
    memory, without it, and without it but with the ``retrieval`` nearest library lines in the prompt."""
    question = (question or "").strip()
    if not question:
        raise gr.Error("Type a question to compare.")
    if chosen_pack(pack) is None:
        raise gr.Error("Choose a memory pack first: the comparison is with and without its memory.")
    options = GenerationOptions(max_new_tokens=int(max_new_tokens))
    boxes = [tab.answer_on, tab.answer_off, tab.answer_rag]
    runs = [dict(memory=True, retrieval=0), dict(memory=False, retrieval=0), dict(memory=False, retrieval=int(retrieval))]
    answers = {box: "" for box in boxes}
    with user_errors():
        for box, run in zip(boxes, runs):
            answers[box] = "..."
            yield dict(answers)
            answers[box] = ""
            for token in service.chat_stream(question, options=options, pack=chosen_pack(pack), save=False, **run):
                answers[box] += token.delta
                yield dict(answers)
            if not answers[box].strip():
                answers[box] = EMPTY_REPLY
                yield dict(answers)


def unload_pack(service: Service, pack: str | None) -> None:
    """Free the chosen pack's adapters on the shared base model (its next chat loads them again)."""
    if chosen_pack(pack) is None:
        raise gr.Error("Choose a memory pack to unload.")
    with user_errors():
        info = service.unload_pack(chosen_pack(pack))
    gr.Info(f"Unloaded pack {info['pack']}: {info['freed_bytes'] / 2**20:.1f} MB freed." if info["unloaded"]
            else f"Pack {info['pack']} was not loaded.")


def save_to_memory(service: Service, conversation: int | None) -> None:
    """The "Save this conversation to memory" button: the open conversation, every user and assistant turn
    so far, becomes a chat source of the library (collection "default"), which the next training learns."""
    if conversation is None:
        raise gr.Error("Send a message first: there is no conversation to save yet.")
    with user_errors():
        result = service.remember_conversation(int(conversation))
    gr.Info(f"Conversation {conversation} saved to memory as source {result.source} ({result.records} turns)."
            if result.status == "added" else
            f"Conversation {conversation} is already in memory as source {result.source} (no new turns).")


def _layout() -> ChatTab:
    conversation = gr.State(None)
    last_reply = gr.State(None)
    with gr.Row():
        pack = gr.Dropdown([BASE], value=BASE, label="Memory pack", elem_id="chat-pack", scale=2,
                           info="The model wears this pack's active version.")
        memory = gr.Checkbox(value=True, label="Memory on", elem_id="chat-memory", scale=1,
                             info="Off: the same pack's base model, no memory.")
        retrieval = gr.Slider(0, 8, value=0, step=1, label="Retrieval: the library lines nearest your message, in the prompt",
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
        remember = gr.Button("Save this conversation to memory", scale=1, elem_id="chat-remember", size="sm")
    retrieved = gr.Dataframe(headers=["score", "source", "line"], value=[], label="Library lines put in the prompt",
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
        compare_k = gr.Slider(1, 8, value=3, step=1, label="Library lines for the retrieval answer")
        with gr.Row():
            answer_on = gr.Textbox(label="Memory on", lines=6, interactive=False, elem_id="compare-on")
            answer_off = gr.Textbox(label="Memory off", lines=6, interactive=False, elem_id="compare-off")
            answer_rag = gr.Textbox(label="Retrieval, memory off", lines=6, interactive=False, elem_id="compare-rag")
    return ChatTab(conversation, last_reply, pack, memory, retrieval, conversations, chatbot, message, send, clear,
                   inspect, unload, retrieved, max_tokens, temperature, top_p, compare_message, compare, compare_k,
                   answer_on, answer_off, answer_rag, remember)


def build_chat_tab(service: Service) -> ChatTab:
    """Lay out the Chat tab and connect its events (called inside the tab's ``gr.Tab``)."""
    tab = _layout()
    tab.unload.click(partial(unload_pack, service), [tab.pack], None, api_name="unload_pack")
    tab.remember.click(partial(save_to_memory, service), [tab.conversation], None, api_name="remember_conversation")
    inputs = [tab.message, tab.chatbot, tab.conversation, tab.pack, tab.memory, tab.retrieval, tab.max_tokens,
              tab.temperature, tab.top_p]
    outputs = [tab.message, tab.chatbot, tab.conversation, tab.last_reply, tab.inspect, tab.retrieved,
               tab.conversations]
    tab.message.submit(partial(send_message, service, tab), inputs, outputs, api_name="chat")
    tab.send.click(partial(send_message, service, tab), inputs, outputs, api_visibility="private")
    tab.clear.click(partial(start_new_chat, tab), None,
                    [tab.message, tab.chatbot, tab.conversation, tab.last_reply, tab.inspect, tab.conversations],
                    api_visibility="private")
    tab.conversations.input(partial(open_conversation, service, tab), tab.conversations,
                            [tab.chatbot, tab.conversation], api_visibility="private")
    tab.compare.click(partial(compare_answers, service, tab), [tab.compare_message, tab.pack, tab.compare_k, tab.max_tokens],
                      [tab.answer_on, tab.answer_off, tab.answer_rag], api_name="compare")
    return tab
