"""Memory and retrieval together on the ten-fact profile: which facts go into the prompt, and where.

The profile of bench/held_out_profile.py (same facts, held-out questions, controls, recipe and
seed) is trained once as the app trains it; then each question is answered (greedy, 24 tokens,
batched) memory off and on: with nothing added to the prompt; with the app's retrieval mode
(the ``k`` library lines nearest the question in the system message: ``Library.search_lines``,
inference/prompting.py); with the ``k`` profile facts nearest the question (all-MiniLM-L6-v2, the
app's embedder) under the same header, i.e. retrieval with a perfect splitter; and with the whole
profile in the system message. Step-bounded and seeded: the result does not depend on the
machine's speed. ``--home`` reuses the data root of an earlier run (its trained pack ``me``)
and only answers.

    python bench/held_out_retrieval.py [--seed 0] [--k 2] [--home DIR]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.held_out_profile import ASKED, CONTROLS, FACTS, train_profile  # noqa: E402
from bench.results_table import publish  # noqa: E402
from bench.train_recall import scratch_service  # noqa: E402
from engram_app.inference import Message  # noqa: E402
from engram_app.inference.prompting import RETRIEVAL_HEADER, with_retrieved  # noqa: E402
from engram_app.ingest.embedding import Embedder  # noqa: E402
from engram_app.training.evaluate import contains_answer, generate_batch_ids  # noqa: E402

SYSTEM = RETRIEVAL_HEADER + "\n{facts}"


def chat_ids(runtime, question: str, system: str | None) -> list[int]:
    return runtime.chat_ids(([Message("system", system)] if system else []) + [Message("user", question)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="the cap on training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=2, help="facts put in the system message per question")
    parser.add_argument("--home", type=Path, default=None, help="answer with the pack of an earlier run's data root")
    args = parser.parse_args()

    if args.home:
        from engram_app.service import Service
        from engram_app.settings import Settings

        service = Service(Settings(home=args.home, device="cpu"))
        result, minutes = {"evaluation": service.packs_store().version("me")["evaluation"]}, 0.0
    else:
        service, home = scratch_service("cpu")
        print("data root:", home, flush=True)
        result, minutes = train_profile(service, args.steps, args.seed)
    evaluation = result["evaluation"]

    probes = ASKED + CONTROLS
    embedder = Embedder()
    fact_vectors = embedder.encode(FACTS)
    question_vectors = embedder.encode([p.prompt for p in probes])
    nearest = [[FACTS[i] for i in np.argsort(-(fact_vectors @ q))[: args.k]] for q in question_vectors]
    whole = SYSTEM.format(facts="\n".join(f"- {f}" for f in FACTS))
    runtime = service.chat_runtime("me")
    tokenizer = runtime.tokenizer
    app_lines = [service.search_lines(p.prompt, k=args.k) for p in probes]
    prompts = {
        "nothing added": [chat_ids(runtime, p.prompt, None) for p in probes],
        f"the app's retrieval: {args.k} nearest library lines in the system message": [
            runtime.chat_ids(with_retrieved([Message("user", p.prompt)], hits)) for p, hits in zip(probes, app_lines)],
        f"{args.k} nearest profile facts in the system message": [
            chat_ids(runtime, p.prompt, SYSTEM.format(facts="\n".join(f"- {f}" for f in near)))
            for p, near in zip(probes, nearest)],
        "the whole profile in the system message": [chat_ids(runtime, p.prompt, whole) for p in probes],
    }
    facts = len(ASKED)
    lines = [
        f"`python bench/held_out_retrieval.py --seed {args.seed} --k {args.k}`: trained {evaluation['steps']} steps "
        f"({evaluation['outcome']}, {minutes:.1f} min); the {args.k} nearest facts hold the asked one for "
        f"{sum(any(p.answer in f for f in near) for p, near in zip(ASKED, nearest))} of {facts} questions, "
        f"the app's {args.k} nearest lines for "
        f"{sum(any(p.answer in h['text'] for h in hits) for p, hits in zip(ASKED, app_lines))}.",
        "",
        "| prompt | memory | held-out recall | controls kept |",
        "|---|---|---:|---:|",
    ]
    detail = []
    for name, encoded in prompts.items():
        for memory in (False, True):
            with runtime.session(), (nullcontext() if memory else runtime.adapted.off()):
                replies = generate_batch_ids(runtime.adapted.model, tokenizer, encoded, 24)
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
            hit = [contains_answer(t, p.answer) for p, t in zip(probes, texts)]
            lines.append(f"| {name} | {'on' if memory else 'off'} | {sum(hit[:facts])}/{facts} | "
                         f"{sum(hit[facts:])}/{len(CONTROLS)} |")
            detail += [f"- {name}, memory {'on' if memory else 'off'}: {p.prompt} -> {t.strip()[:80]!r}"
                       for p, t in zip(probes, texts)]
    publish(f"held_out_retrieval-seed{args.seed}-k{args.k}", lines + ["", *detail])


if __name__ == "__main__":
    main()
