"""The inspector: a reply (or any text) as a strip of tokens coloured by how strongly memory fired.

Selecting a token shows its slots (layer, order, head, row, n-gram), the sources that wrote those
rows with the passage, and the token's memory effect (log-probability with memory on minus off).
A stored reply is shown from the trace recorded while it was generated (no second pass); a typed
text is traced in one forward pass. Everything from a user's documents reaches the page as text
through Gradio's components (never as HTML).
"""

from __future__ import annotations

from collections import Counter

import gradio as gr
import pandas as pd

from engram_app.errors import EngramError
from engram_app.service import Service
from engram_app.ui.errors import user_errors

SLOT_COLUMNS = ["layer", "order", "head", "row", "n-gram"]
SOURCE_COLUMNS = ["source", "n-gram it wrote", "slots", "times", "passage"]


def reply_choices(service: Service) -> list[tuple[str, int]]:
    return [(f"#{r['id']} [{r['pack']} v{r['version'] or '-'}] {' '.join(r['content'].split())[:70]}", r["id"])
            for r in service.replies(limit=50)]


def memory_packs(service: Service) -> list[str]:
    return [p["name"] for p in service.packs() if p["mode"] != "lora"]


def _strength(token: dict) -> float:
    """How strongly memory fired at a token: the largest gate over its layers (0..1)."""
    return max((m["gate"] for m in token["memory"]), default=0.0)


def _view(report: dict):
    """The outputs of an inspection: token strip, gate chart, top-slot chart, summary."""
    tokens = report["tokens"]
    strip = [(t["text"], round(_strength(t), 3)) for t in tokens]
    gates = pd.DataFrame({
        "position": [i for i, t in enumerate(tokens) for _ in t["memory"]],
        "gate": [m["gate"] for t in tokens for m in t["memory"]],
        "layer": pd.Series([f"layer {m['layer']}" for t in tokens for m in t["memory"]], dtype=object),
    })
    used = Counter((m["layer"], s["order"], s["head"], s["row"]) for t in tokens for m in t["memory"] for s in m["slots"])
    top = used.most_common(15)
    slots = pd.DataFrame({"slot": pd.Series([f"L{l} o{o} h{h} r{r}" for (l, o, h, r), _ in top], dtype=object),
                          "tokens": [c for _, c in top]})
    effects = [t["effect"]["effect"] for t in tokens if t.get("effect")]
    summary = (f"{len(tokens)} tokens from pack **{report['pack']}** (version {report['version'] or 'untrained'}). "
               f"Mean gate {sum(s for _, s in strip) / max(len(strip), 1):.2f}"
               + (f"; mean memory effect {sum(effects) / len(effects):+.2f} nats per token." if effects else ".")
               + " Select a token to see its slots and where they came from.")
    # Never send an empty frame to a plot (Gradio 6.31 draws nothing after one: see train_tab.py).
    top_plot = gr.BarPlot(value=slots, y_lim=[0, max(c for _, c in top)]) if top else gr.skip()
    return strip, (gates if len(gates) else gr.skip()), top_plot, summary


def inspect_report(service: Service, pack: str | None, message: int | None, text: str | None) -> dict:
    """Per-token reports (JSON-shaped, with each token's memory effect) of a stored reply or a text."""
    if message is not None:
        stored = service.reply_trace(int(message))
        pack, ids, start, traces, version = stored["pack"], stored["ids"], stored["start"], stored["tokens"], stored["version"]
    else:
        if not pack:
            raise EngramError("Choose a memory pack to look into.")
        if not (text or "").strip():
            raise EngramError("Type a text to inspect, or choose a reply.")
        traces = service.inspect(pack, text=text)
        ids, start = [t.id for t in traces], 0
        version = service.pack(pack)["active_version"]
    effects = {e["position"]: e for e in service.memory_effect(pack, ids, start=max(start, 1))}
    tokens = []
    for t in traces:
        entry = t.to_json()
        entry["position"] = t.position
        entry["effect"] = effects.get(t.position)
        tokens.append(entry)
    return {"pack": pack, "version": version, "tokens": tokens}


def token_details(service: Service, report: dict, index: int):
    token = report["tokens"][index]
    slots = [[m["layer"], s["order"], s["head"], s["row"], s["ngram"]] for m in token["memory"] for s in m["slots"]]
    rows = sorted({s["row"] for m in token["memory"] for s in m["slots"]})
    writers = service.provenance(report["pack"], rows, version=report["version"], limit=3) if report["version"] else {}
    grouped: dict[tuple, list] = {}  # one line per (source, n-gram): how many of the token's slots it wrote
    for row in rows:
        for w in writers.get(row, []):
            title = w["title"] or "(untitled)"
            label = f"{title[:60]}{'...' if len(title) > 60 else ''} (source {w['source']}" + (
                ", deleted)" if w["status"] == "deleted" else ")")
            entry = grouped.setdefault((w["source"], w["ngram"]), [label, w["ngram"], 0, 0, w["passage"]])
            entry[2] += 1
            entry[3] += w["count"]
    sources = sorted(grouped.values(), key=lambda e: (-e[2], -e[3]))
    gates = ", ".join(f"layer {m['layer']}: gate {m['gate']:.2f}, |Y|/|h| {m['ratio']:.2f}" for m in token["memory"])
    effect = token.get("effect")
    effect_text = (f"memory effect {effect['effect']:+.2f} nats (log-probability {effect['logprob_on']:.2f} with memory, "
                   f"{effect['logprob_off']:.2f} without)" if effect else "no memory effect for the first token")
    lines = [f"Token {index + 1} of {len(report['tokens'])}, position {token['position']}, id {token['id']}: {gates}; "
             f"{effect_text}."]
    if not report["version"]:
        lines.append("The pack is not trained yet: no source wrote these rows.")
    elif not sources:
        lines.append("No source in this version wrote these rows (or the version was imported without its sources).")
    # The token's own text goes in a Textbox (plain text), never into this Markdown.
    return "\n\n".join(lines), token["text"], slots, sources


def build_inspect_tab(service: Service):
    report = gr.State(None)
    with gr.Row():
        reply = gr.Dropdown([], value=None, label="A reply generated with memory", elem_id="inspect-reply", scale=3)
        show_reply = gr.Button("Inspect reply", variant="primary", elem_id="inspect-reply-run", scale=1)
    with gr.Row():
        pack = gr.Dropdown([], value=None, label="Or any text, with pack", elem_id="inspect-pack", scale=1)
        text = gr.Textbox(label="Text", placeholder="Type a text to see which memory slots it reads",
                          elem_id="inspect-text", scale=3, lines=1)
        show_text = gr.Button("Inspect text", elem_id="inspect-text-run", scale=1)
    summary = gr.Markdown("Choose a reply or type a text.", elem_id="inspect-summary")
    strip = gr.HighlightedText(label="Tokens, coloured by the memory's gate (select one)", elem_id="inspect-strip",
                               show_legend=False, show_inline_category=False, combine_adjacent=False,
                               interactive=False)
    with gr.Row():
        token_text = gr.Textbox(label="Selected token", interactive=False, elem_id="inspect-token", scale=1)
        details = gr.Markdown("", elem_id="inspect-details")
    slots = gr.Dataframe(headers=SLOT_COLUMNS, value=[], label="Slots the token read", interactive=False,
                         elem_id="inspect-slots", wrap=True)
    sources = gr.Dataframe(headers=SOURCE_COLUMNS, value=[], label="Sources that wrote those slots",
                           interactive=False, elem_id="inspect-sources", wrap=True,
                           column_widths=["22%", "14%", "7%", "7%", "50%"])
    with gr.Row():
        gate_plot = gr.LinePlot(x="position", y="gate", color="layer", title="Gate along the text", height=240,
                                elem_id="inspect-gates", y_lim=[0, 1])
        slot_plot = gr.BarPlot(x="slot", y="tokens", title="Most used slots (layer, order, head, row)", height=240,
                               elem_id="inspect-top", sort="-y", x_label_angle=-35)

    def run(message: int | None, p: str | None, t: str | None):
        with user_errors():
            result = inspect_report(service, p, message, t)
        strip_value, gates, top, text_summary = _view(result)
        return result, strip_value, gates, top, text_summary, "", "", [], []

    def select(current: dict | None, evt: gr.SelectData):
        if current is None or evt.index is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        with user_errors():
            return token_details(service, current, int(index))

    outputs = [report, strip, gate_plot, slot_plot, summary, details, token_text, slots, sources]
    show_reply.click(lambda m: run(m, None, None), reply, outputs, api_name="inspect_reply")
    show_text.click(lambda p, t: run(None, p, t), [pack, text], outputs, api_name="inspect_text")
    text.submit(lambda p, t: run(None, p, t), [pack, text], outputs, api_visibility="private")
    strip.select(select, report, [details, token_text, slots, sources], api_visibility="private")

    def refresh(current_pack: str | None, current_reply: int | None):
        names = memory_packs(service)
        choices = reply_choices(service)
        ids = [v for _, v in choices]
        return (gr.update(choices=names, value=current_pack if current_pack in names else (names[0] if names else None)),
                gr.update(choices=choices, value=current_reply if current_reply in ids else (ids[0] if ids else None)))

    return refresh, pack, reply, outputs, run
