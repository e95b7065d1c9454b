"""Does the model remember a person? Engram vs LoRA vs Engram + LoRA vs retrieval, same budget.

Personas from Synthetic-Persona-Chat (the "user 1 personas" of the first conversations) are
imported as profiles; each method trains one pack on all of them for the same wall-clock
budget; every fact a question pattern matches becomes a probe ("What is my dog called?" ->
"Pixel"). Retrieval trains nothing: the top-k chunks of the library for the question go into the
prompt. Reported: recall (the greedy reply contains the answer), the mean log-probability of the
answer after the prompt and its gain over the base model, memorisation (loss on the trained
text) and the forgetting cost (loss on the base model's own replies, relative to the base).

    python bench/train_recall.py --data ../shared/data/ --personas 4 --minutes 2
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_table import publish  # noqa: E402
from engram_app.service import Service  # noqa: E402
from engram_app.settings import Settings, default_home  # noqa: E402
from engram_app.training import JobQueue, TrainOptions  # noqa: E402
from engram_app.training.evaluate import answer_logprob, greedy_reply  # noqa: E402
from engram_app.training.runner import JobRunner  # noqa: E402
from engram_app.training.text import Probe, fact_probes  # noqa: E402


def personas(data: Path, count: int) -> list[list[str]]:
    path = data / "synthetic-persona-chat-valid.csv" if data.is_dir() else data
    out = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            facts = [line.strip() for line in row["user 1 personas"].splitlines() if line.strip()]
            if sum(len(fact_probes(f)) for f in facts) >= 2:  # personas with at least two askable facts
                out.append(facts)
            if len(out) == count:
                break
    return out


def scratch_service(device: str, home: Path | None = None) -> tuple[Service, Path]:
    """A service on a new temporary data root (or on ``home``, made if missing) that reuses the
    converted model of the default one."""
    home = Path(tempfile.mkdtemp(prefix="engram-bench-")) if home is None else home
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to((default_home() / "models").resolve())
    return Service(Settings(home=home, device=device)), home


def import_personas(service: Service, home: Path, data: Path, count: int) -> tuple[list[list[str]], list[Probe]]:
    """Each persona as a profile in the library; the probes with a single answer across them all.

    All personas go into one pack, as if they were one person: a question two personas answer
    differently ("What do I like?") has no single right answer, so it is not a probe.
    """
    people = personas(data, count)
    probes: list[Probe] = []
    for i, facts in enumerate(people):
        path = home / f"persona{i}.md"
        path.write_text("\n".join(f"- {f}" for f in facts) + "\n")
        service.ingest([path])
        probes += [p for f in facts for p in fact_probes(f)]
    asked = [p.prompt for p in probes]
    return people, [p for p in probes if asked.count(p.prompt) == 1]


def run_job(service: Service, pack: str, options: TrainOptions) -> dict:
    service.train(pack, options, start_worker=False)
    queue = JobQueue(service.db())
    row = queue.claim("bench")
    result = JobRunner(service.settings, service.db(), row).run()
    queue.finish(row["id"], "done", result)
    return result


def retrieval(service: Service, probes: list[Probe], k: int) -> dict:
    runtime = service.runtime
    hits_on, logprobs = 0, []
    for probe in probes:
        context = "\n".join(hit["text"] for hit in service.search(probe.prompt, k=k))
        prompt = f"Here is what you know about me:\n{context}\n\n{probe.prompt}"
        reply, _ = greedy_reply(runtime.model, runtime.tokenizer, prompt)
        hits_on += probe.answer.lower() in reply.lower()
        logprobs.append(answer_logprob(runtime.model, runtime.tokenizer, prompt, probe.answer))
    return {"recall": hits_on / len(probes), "mean_logprob": sum(logprobs) / len(logprobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder or CSV of Synthetic-Persona-Chat")
    parser.add_argument("--personas", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per method")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the Engram dense parts")
    parser.add_argument("--engram-lrs", default="", help="extra Engram-only runs at these learning rates, e.g. 1e-3,1e-2")
    parser.add_argument("--methods", default="engram,lora,engram+lora,retrieval")
    parser.add_argument("--k", type=int, default=3, help="chunks put in the prompt by retrieval")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    service, home = scratch_service(args.device)
    people, probes = import_personas(service, home, args.data, args.personas)
    print(f"{len(people)} personas, {sum(map(len, people))} facts, {len(probes)} probes", flush=True)

    base = None
    rows = []
    runs = [(m, args.lr) for m in args.methods.split(",")]
    runs += [("engram", float(lr)) for lr in args.engram_lrs.split(",") if lr]
    for method, lr in runs:
        started = time.perf_counter()
        if method == "retrieval":
            summary = retrieval(service, probes, args.k)
            rows.append((method, summary["recall"], summary["mean_logprob"], None, None, None, 0,
                         time.perf_counter() - started))
            continue
        name = f"{method.replace('+', '-')}-{lr:g}"
        service.create_pack(name, size="medium", mode=method)
        result = run_job(service, name, TrainOptions(max_minutes=args.minutes, max_steps=100_000, lr=lr, max_probes=0))
        ev = result["evaluation"]
        report = service.evaluate(name, probes)
        base = base or report["summary"]["memory_off"]
        on = report["summary"]["memory_on"]
        label = method if method == "lora" else f"{method} (lr {lr:g})"
        rows.append((label, on["recall"], on["mean_logprob"], ev["memorisation"]["before"], ev["memorisation"]["after"],
                     ev["retention"]["cost"], ev["steps"], time.perf_counter() - started))

    if base is None:
        runtime = service.runtime
        base = {"recall": sum(p.answer.lower() in greedy_reply(runtime.model, runtime.tokenizer, p.prompt)[0].lower()
                              for p in probes) / len(probes),
                "mean_logprob": sum(answer_logprob(runtime.model, runtime.tokenizer, p.prompt, p.answer)
                                    for p in probes) / len(probes)}
    lines = [
        f"Memory of {len(people)} personas ({len(probes)} probes), {args.minutes} min of training per method, "
        f"lr {args.lr}, device {args.device}",
        "",
        "| method | recall | mean logprob | logprob gain vs base | memorisation loss before -> after | forgetting cost | steps | seconds |",
        "|---|---|---|---|---|---|---|---|",
        f"| base model | {base['recall']:.2f} | {base['mean_logprob']:.3f} | 0 | | | | |",
    ]
    for method, recall, logprob, mem_before, mem_after, cost, steps, seconds in rows:
        memorised = f"{mem_before:.3f} -> {mem_after:.3f}" if mem_before is not None else ""
        forgetting = f"{cost:+.1%}" if cost is not None else ""
        lines.append(f"| {method} | {recall:.2f} | {logprob:.3f} | {logprob - base['mean_logprob']:+.3f} | {memorised} | "
                     f"{forgetting} | {steps} | {seconds:.0f} |")
    publish("train_recall", lines)


if __name__ == "__main__":
    main()
