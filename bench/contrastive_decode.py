"""A lever measured (stop 34, not adopted): contrastive decoding between memory on and memory off.

Most held-out misses are replies whose first words the frozen model takes from the question ("Do
you remember my sister?" -> "You remember your sister?"): at a reply's first tokens the memory's
n-grams are the chat template's, the same for every question, so its push is weak against the
model's copy of the question. Contrastive decoding (as in context-aware decoding, Shi et al. 2023)
amplifies what the memory changes: each greedy step takes the token maximising
``log p_on + alpha * (log p_on - log p_off)``, among the tokens within 10 nats of memory on's best
(the plausibility cut), so the memory's effect counts 1 + alpha times. It costs a second forward
pass per token (memory off).

Each person of ``--split`` is imported as a profile and trained as the app trains an Engram pack
(``--steps``, step-bounded: the result does not depend on the machine's speed, only its thread
count); then every held-out question and control is answered greedily (``--tokens`` at most, the
full forward pass each step, fp32) at each ``--alphas`` value; alpha 0 is plain greedy decoding,
the baseline of the same packs in the same run. ``--keep DIR`` keeps each person's data root
there and reuses it on a later run (answers only).

    python bench/contrastive_decode.py --data ../shared/data/ --people 12 --split tuning --alphas 0,0.5,1
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recall import (CONTROLS, Shared, add_people_arguments, choose_probes, control_right,  # noqa: E402
                          import_person, people_of, train)
from bench.results_table import publish  # noqa: E402
from bench.train_recall import scratch_service  # noqa: E402
from engram_app.inference import Message  # noqa: E402
from engram_app.training import TrainOptions  # noqa: E402
from engram_app.training.evaluate import contains_answer  # noqa: E402

log = logging.getLogger("bench.contrastive_decode")
PLAUSIBLE_NATS = 10.0


@torch.no_grad()
def contrastive_reply(runtime, question: str, alpha: float, max_new_tokens: int, first: int | None = None) -> str:
    """The greedy reply to ``question`` scoring each token by log p_on + alpha (log p_on - log p_off);
    with ``first``, only the reply's first ``first`` tokens (plain greedy after them)."""
    model, adapted = runtime.model, runtime.adapted
    ids = runtime.chat_ids([Message("user", question)])
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        on = torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1)
        score = on
        if alpha and (first is None or len(new) < first):
            with adapted.off():
                off = torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1)
            score = on + alpha * (on - off)
            score[on < on.max() - PLAUSIBLE_NATS] = float("-inf")
        token = int(score.argmax())
        if token in runtime.stop_ids:
            break
        new.append(token)
        ids.append(token)
    return runtime.tokenizer.decode(new, skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_people_arguments(parser, people=12, split="tuning")
    parser.add_argument("--steps", type=int, default=100, help="the cap on each job's training steps")
    parser.add_argument("--alphas", default="0,0.5,1", help="contrast weights; 0 is plain greedy decoding")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per reply at most")
    parser.add_argument("--first", type=int, default=None,
                        help="contrast only the reply's first FIRST tokens (where the echo of the question starts)")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) each person's data root here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    alphas = [float(a) for a in args.alphas.split(",")]

    people = people_of(args.data, args.people, args.split)
    for person in people:
        choose_probes(person, "profile")
    tallies = {alpha: [0, 0, 0, 0] for alpha in alphas}  # hits, probes, controls right, controls
    shared, steps = Shared(), []
    for person in [p for p in people if p.probes]:
        service, home = scratch_service("cpu", args.keep / f"{args.split}-{person.row}" if args.keep else None)
        try:
            trained = home / "bench-trained"  # written once the person's pack is trained (--keep reuses it)
            if not trained.is_file():
                import_person(service, home, person, "profile")
                job = train(service, "engram", "medium", TrainOptions(max_steps=args.steps, evaluate=True), shared)
                steps.append(job["result"].get("steps", 0))
                trained.write_text(str(steps[-1]))
            runtime = service.chat_runtime("engram")
            for alpha in alphas:
                tally = tallies[alpha]
                for probe in person.probes:
                    reply = contrastive_reply(runtime, probe["prompt"], alpha, args.tokens, args.first)
                    hit = contains_answer(reply, probe["answer"])
                    tally[0] += hit
                    tally[1] += 1
                    log.info("row %d, alpha %g: %r -> %r (%s)", person.row, alpha, probe["prompt"], reply,
                             "hit" if hit else "miss")
                for question, spellings in CONTROLS:
                    reply = contrastive_reply(runtime, question, alpha, args.tokens, args.first)
                    right = control_right(reply, spellings)
                    tally[2] += right
                    tally[3] += 1
                    log.info("row %d, alpha %g: %r -> %r (%s)", person.row, alpha, question, reply,
                             "right" if right else "wrong")
            del service, runtime
        finally:
            if args.keep is None:
                shutil.rmtree(home, ignore_errors=True)  # the models symlink is removed, not followed

    base = tallies[alphas[0]]
    packs_from = f"jobs trained here: mean {sum(steps) / len(steps):.0f} steps" if steps else "packs of an earlier run"
    contrast = f", contrast on the first {args.first}" if args.first else ""
    lines = [f"Split {args.split}, {len(people)} people, profiles, step-bounded ({args.steps} at most; {packs_from}), "
             f"greedy fp32, {args.tokens} tokens{contrast}; controls: all {len(CONTROLS)} per person (memory on).", "",
             "| alpha | recall | controls | recall vs alpha " + f"{alphas[0]:g} | controls vs alpha {alphas[0]:g} |",
             "|---|---|---|---|---|"]
    for alpha, (hits, probes, right, controls) in tallies.items():
        lines.append(f"| {alpha:g} | {hits / max(1, probes):.2f} ({hits}/{probes}) | {right}/{controls} | "
                     f"{hits / max(1, base[0]):.2f}x | {right / max(1, base[2]):.2f}x |")
    publish(f"contrastive_decode-{args.split}" + (f"-first{args.first}" if args.first else ""), lines)


if __name__ == "__main__":
    main()
