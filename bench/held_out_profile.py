"""A ten-fact profile asked in new words: does memory alone recall what it was taught?

The profile is trained as the app trains it (a medium pack, until its own questions are recalled
twice in a row, ``--steps`` the cap), then asked ten hand-written questions that no training text
uses (checked) and general controls the base model answers right, memory on and off (greedy,
batched), and a second set of ten (set B, stop 39) in words of their own. Step-bounded and seeded:
the result does not depend on the machine's speed (it does on the thread count, and a fact at the
edge can flip with the batch its question is asked in).

    python bench/held_out_profile.py --seed 0 [--train-on 2] [--orders 2,3,4] [--layers 1] [--synonyms] [--frames] [--cool 0.25] [--consolidate 1.75]

``--train-on`` sets the job's ``TrainOptions.consolidate`` (the default, 1: stop as soon as the
facts are learned; 2 was measured at stop 38 and not adopted). ``--synonyms``, ``--frames``, ``--cool`` and ``--consolidate`` are levers measured and not
adopted (bench/held_out_levers.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import held_out_levers  # noqa: E402
from bench.results_table import publish  # noqa: E402
from bench.train_recall import run_job, scratch_service  # noqa: E402
from engram_app.training import TrainOptions, sizes  # noqa: E402
from engram_app.training.evaluate import contains_answer, generate_batch  # noqa: E402
from engram_app.training.text import GENERIC_QUESTIONS, Probe, fact_training_pairs  # noqa: E402

FACTS = ["My dog is called Pixel.", "I have a turtle named Timothy.", "I live in Porto.", "I work as a glassblower.",
         "My sister is called Amelia.", "I was born in Kyoto.", "My favourite colour is teal.", "I play the bassoon.",
         "I drive a Volvo.", "I grew up in Galway."]
ASKED = [Probe("What name did I give my dog?", "Pixel"), Probe("Do you know my turtle's name?", "Timothy"),
         Probe("In what city is my home?", "Porto"), Probe("What's my occupation?", "glassblower"),
         Probe("What's my sister's name?", "Amelia"), Probe("In which city was I born?", "Kyoto"),
         Probe("Which colour do I like best?", "teal"), Probe("Which instrument do I play?", "bassoon"),
         Probe("What car do I drive?", "Volvo"), Probe("Which town did I grow up in?", "Galway")]
# A second set, written at stop 39 before measuring bench/held_out_levers.synonym_answers and in
# none of its words, to tell a lever that helps questions in general from one fitted to ASKED's misses.
ASKED_B = [Probe("What do I call my dog?", "Pixel"), Probe("Remind me of my turtle's name.", "Timothy"),
           Probe("What city do I stay in?", "Porto"), Probe("What's my line of work?", "glassblower"),
           Probe("Who is my sister?", "Amelia"), Probe("What's my city of birth?", "Kyoto"),
           Probe("What is my preferred colour?", "teal"), Probe("What do I play in my free time?", "bassoon"),
           Probe("What's the make of my car?", "Volvo"), Probe("Where was I brought up?", "Galway")]
CONTROLS = [Probe("What is the capital of France?", "Paris"), Probe("How many days are in a week?", "7"),
            Probe("What colour is the sky on a clear day?", "blue"), Probe("Write one sentence about the sea.", "sea")]


def train_profile(service, steps: int, seed: int, consolidate: float = TrainOptions.consolidate) -> tuple[dict, float]:
    """The ten facts as a profile file in ``service``'s library, trained into pack ``me`` as the app
    trains it (``steps`` the cap); returns the job's result and its minutes."""
    profile = service.settings.home / "me.md"
    profile.write_text("# About me\n" + "".join(f"- {fact}\n" for fact in FACTS))
    service.ingest([profile])
    service.create_pack("me")
    started = time.perf_counter()
    result = run_job(service, "me", TrainOptions(max_steps=steps, seed=seed, consolidate=consolidate))
    return result, (time.perf_counter() - started) / 60


def replies(adapted, tokenizer, probes: list[Probe]) -> list[str]:
    """The greedy replies the job's stop test would read (``evaluate.recalled``'s batches and length)."""
    rows = generate_batch(adapted.model, tokenizer, [p.prompt for p in probes], 24, 16)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="the cap on training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orders", default=None, help="n-gram orders of the memory, e.g. 2,3,4 (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", action="store_true", help="more answer sentences per fact (not adopted)")
    parser.add_argument("--cool", type=float, default=1.0,
                        help="learning rate x this at the first check recalling every fact (not adopted)")
    parser.add_argument("--consolidate", type=float, default=1.0,
                        help="after 'recalled', train on to this x the steps (not adopted)")
    parser.add_argument("--ask-frame", default=None, metavar="FRAME",
                        help="each fact pattern also trained with its question inside FRAME, e.g. 'Can you tell me {q}?'")
    parser.add_argument("--synonyms", action="store_true",
                        help="answers also in other words for a home, a job, a favourite (bench/held_out_levers.synonym_answers)")
    parser.add_argument("--layers", default=None, metavar="L[,L]",
                        help="the memory at these 0-based decoder blocks (default: the preset's middle block)")
    parser.add_argument("--train-on", type=float, default=TrainOptions.consolidate, metavar="X",
                        help="once the job's stop test says learned at step S, train on to X x S "
                        f"(TrainOptions.consolidate, default {TrainOptions.consolidate:g})")
    args = parser.parse_args()
    if args.layers:
        held_out_levers.memory_layers([int(x) for x in args.layers.split(",")])
    if args.ask_frame:
        held_out_levers.ask_frames(args.ask_frame)
    if args.frames:
        held_out_levers.more_frames()
    if args.synonyms:
        held_out_levers.synonym_answers()
    if args.cool != 1.0 or args.consolidate != 1.0:
        held_out_levers.recall_stop(args.cool, args.consolidate)
    flags = "".join([" --frames" if args.frames else "", f" --cool {args.cool:g}" if args.cool != 1.0 else "",
                     f" --consolidate {args.consolidate:g}" if args.consolidate != 1.0 else ""])
    levers = flags + (f" --ask-frame '{args.ask_frame}'" if args.ask_frame else "") + \
        (f" --layers {args.layers}" if args.layers else "") + (" --synonyms" if args.synonyms else "") + (f" --train-on {args.train_on:g}" if args.train_on != TrainOptions.consolidate else "")

    trained = {q for fact in FACTS for q, _ in fact_training_pairs(fact)} | set(GENERIC_QUESTIONS)
    assert not trained & {p.prompt for p in ASKED + ASKED_B}, "a held-out question is a training question"
    if args.orders:
        preset_config = sizes.SizePreset.engram_config
        orders = tuple(int(n) for n in args.orders.split(","))

        def with_orders(self):
            config = preset_config(self)
            config.orders = orders
            return config

        sizes.SizePreset.engram_config = with_orders
    service, _ = scratch_service(args.device)
    train_on = 1.0 if args.cool != 1.0 or args.consolidate != 1.0 else args.train_on  # recall_stop trains on itself
    result, minutes = train_profile(service, args.steps, args.seed, train_on)
    evaluation = result["evaluation"]
    runtime = service.chat_runtime("me")
    probes = ASKED + CONTROLS + ASKED_B
    with runtime.session():
        said_on = replies(runtime.adapted, runtime.tokenizer, probes)
        with runtime.adapted.off():
            said_off = replies(runtime.adapted, runtime.tokenizer, probes)
    on = [contains_answer(reply, p.answer) for p, reply in zip(probes, said_on)]
    off = [contains_answer(reply, p.answer) for p, reply in zip(probes, said_off)]
    facts = len(ASKED)
    kept = [i for i in range(facts, facts + len(CONTROLS)) if off[i]]
    set_b = slice(facts + len(CONTROLS), len(probes))
    cost = (evaluation.get("retention") or {}).get("cost")
    lines = [
        f"`python bench/held_out_profile.py --seed {args.seed} --steps {args.steps}"
        + (f" --orders {args.orders}" if args.orders else "") + levers + "`",
        "",
        "| steps to recalled | held-out recall, memory on | memory off | set B on | set B off | controls kept "
        "| retention cost | minutes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {evaluation['steps']} ({evaluation['outcome']}) | {sum(on[:facts])}/{facts} | {sum(off[:facts])}/{facts} "
        f"| {sum(on[set_b])}/{len(ASKED_B)} | {sum(off[set_b])}/{len(ASKED_B)} "
        f"| {sum(on[i] for i in kept)}/{len(kept)} | {'' if cost is None else f'{cost:+.1%}'} | {minutes:.1f} |",
        "",
        *(f"- {p.prompt} ({p.answer}): memory on {'yes' if a else 'no'}, off {'yes' if b else 'no'}"
          + ("" if a else f" (memory on: {' '.join(reply.split())!r})")
          for p, a, b, reply in zip(probes, on, off, said_on)),
    ]
    publish(f"held_out_profile-seed{args.seed}" + (f"-orders{args.orders.replace(',', '')}" if args.orders else "")
            + flags.replace(" --", "-").replace(" ", "") + ("-ask-frame" if args.ask_frame else "")
            + (f"-layers{args.layers.replace(',', '+')}" if args.layers else "") + ("-synonyms" if args.synonyms else "")
            + (f"-train-on{args.train_on:g}" if args.train_on != TrainOptions.consolidate else ""), lines)


if __name__ == "__main__":
    main()
