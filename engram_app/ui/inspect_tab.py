"""The inspector: a reply (or any text) as a strip of tokens coloured by how strongly memory fired.

Selecting a token shows its slots (layer, order, head, row, n-gram), the sources that wrote those
rows with the passage, and the token's memory effect (log-probability with memory on minus off).
A stored reply is shown from the trace recorded while it was generated (no second pass); a typed
text is traced in one forward pass. The report is the one the CLI's ``inspect`` prints
(``Service.inspect_report``). Everything from a user's documents reaches the page as text through
Gradio's components (never as HTML).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from engram_app.errors import EngramError
from engram_app.inference.report import slot_writers
from engram_app.service import Service
from engram_app.ui.errors import user_errors

SLOT_COLUMNS = ["layer", "order", "head", "row", "n-gram"]
SOURCE_COLUMNS = ["source", "n-gram it wrote", "slots", "times", "passage"]
SOURCES_PER_SLOT = 3  # the writers read per slot of a selected token (grouped by source in the table)


@dataclass
class InspectTab:
    """The Inspect tab's components, by name: its handlers write them, Chat's "Inspect last reply" too."""

    report: gr.State  # the report shown (Service.inspect_report), for selecting a token in it
    reply: gr.Dropdown
    show_reply: gr.Button
    pack: gr.Dropdown
    text: gr.Textbox
    show_text: gr.Button
    summary: gr.Markdown
    strip: gr.HighlightedText
    token_text: gr.Textbox
    details: gr.Markdown
    slots: gr.Dataframe
    sources: gr.Dataframe
    gate_plot: gr.LinePlot
    slot_plot: gr.BarPlot

    @property
    def report_outputs(self) -> list:
        """What showing a report writes: the report, its views, and the token details emptied."""
        return [self.report, self.strip, self.gate_plot, self.slot_plot, self.summary, self.details, self.token_text,
                self.slots, self.sources]


def reply_choices(service: Service) -> list[tuple[str, int]]:
    return [(f"#{r['id']} [{r['pack']} v{r['version'] or '-'}] {' '.join(r['content'].split())[:70]}", r["id"])
            for r in service.replies(limit=50)]


def memory_packs(service: Service) -> list[str]:
    return [p["name"] for p in service.packs() if p["mode"] != "lora"]


def refresh_inspect_choices(service: Service, tab: InspectTab, current_pack: str | None,
                            current_reply: int | None) -> dict:
    """The pack and reply lists as they are now (the chosen ones kept while they exist, else the newest)."""
    names = memory_packs(service)
    choices = reply_choices(service)
    ids = [v for _, v in choices]
    pack = current_pack if current_pack in names else (names[0] if names else None)
    reply = current_reply if current_reply in ids else (ids[0] if ids else None)
    return {tab.pack: gr.update(choices=names, value=pack), tab.reply: gr.update(choices=choices, value=reply)}


def strength(token: dict) -> float:
    """How strongly memory fired at a token: the largest gate over its layers (0..1)."""
    return max((m["gate"] for m in token["memory"]), default=0.0)


def show_report(tab: InspectTab, report: dict) -> dict:
    """A report's views: token strip, gate chart, top-slot chart, summary; the token details emptied."""
    tokens = report["tokens"]
    strip = [(t["text"], round(strength(t), 3)) for t in tokens]
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
    views = {tab.report: report, tab.strip: strip, tab.summary: summary, tab.details: "", tab.token_text: "",
             tab.slots: [], tab.sources: []}
    # Never send an empty frame to a plot (Gradio 6.31 draws nothing after one: see train_tab.py).
    if len(gates):
        views[tab.gate_plot] = gates
    if top:
        views[tab.slot_plot] = gr.BarPlot(value=slots, y_lim=[0, max(c for _, c in top)])
    return views


def inspect_reply(service: Service, tab: InspectTab, message: int | None) -> dict:
    """The "Inspect reply" button: a stored reply, from the trace recorded while it was generated."""
    with user_errors():
        return show_report(tab, service.inspect_report(message=message, effect=True))


def inspect_text(service: Service, tab: InspectTab, pack: str | None, text: str | None) -> dict:
    """The "Inspect text" button (or Enter): any text, traced in one forward pass with the chosen pack."""
    with user_errors():
        if pack and not (text or "").strip():  # without a pack the report asks for one first
            raise EngramError("Type a text to inspect, or choose a reply.")
        return show_report(tab, service.inspect_report(pack, text=text, effect=True))


def token_details(service: Service, report: dict, index: int) -> tuple[str, str, list, list]:
    """A selected token: its gates and memory effect (text), its own text, its slots, and the sources
    that wrote them (one line per source and n-gram: how many of the token's slots it wrote)."""
    token = report["tokens"][index]
    slots = [[m["layer"], s["order"], s["head"], s["row"], s["ngram"]] for m in token["memory"] for s in m["slots"]]
    rows = sorted({s["row"] for m in token["memory"] for s in m["slots"]})
    writers = slot_writers(service, report, [token], limit=SOURCES_PER_SLOT)
    grouped: dict[tuple, list] = {}
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
    lines = [f"Token {index + 1} of {len(report['tokens'])}, position {report['start'] + index}, id {token['id']}: "
             f"{gates}; {effect_text}."]
    if not report["version"]:
        lines.append("The pack is not trained yet: no source wrote these rows.")
    elif not sources:
        lines.append("No source in this version wrote these rows (or the version was imported without its sources).")
    # The token's own text goes in a Textbox (plain text), never into this Markdown.
    return "\n\n".join(lines), token["text"], slots, sources


def select_token(service: Service, report: dict | None, selected: int | list | tuple | None):
    """Selecting a token of the strip (``selected``: Gradio's index of it) shows its details."""
    if report is None or selected is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    index = selected[0] if isinstance(selected, (list, tuple)) else selected
    with user_errors():
        return token_details(service, report, int(index))


def _layout() -> InspectTab:
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
    return InspectTab(report, reply, show_reply, pack, text, show_text, summary, strip, token_text, details, slots,
                      sources, gate_plot, slot_plot)


def build_inspect_tab(service: Service) -> InspectTab:
    """Lay out the Inspect tab and connect its events (called inside the tab's ``gr.Tab``)."""
    tab = _layout()
    tab.show_reply.click(partial(inspect_reply, service, tab), tab.reply, tab.report_outputs, api_name="inspect_reply")
    tab.show_text.click(partial(inspect_text, service, tab), [tab.pack, tab.text], tab.report_outputs,
                        api_name="inspect_text")
    tab.text.submit(partial(inspect_text, service, tab), [tab.pack, tab.text], tab.report_outputs,
                    api_visibility="private")

    # A def, not functools.partial: Gradio finds the SelectData parameter by its annotation, which a partial hides.
    def on_token_selected(report: dict | None, event: gr.SelectData):
        return select_token(service, report, event.index)

    tab.strip.select(on_token_selected, tab.report, [tab.details, tab.token_text, tab.slots, tab.sources],
                     api_visibility="private")
    return tab
