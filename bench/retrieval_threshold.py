"""Where to cut chat's retrieval: how similar a question is to the line it is about, and to none.

For the people of ``bench/recall.py`` (the same rows and halves; the tuning half by default, the
half a setting may be chosen on), every held-out question is embedded with the app's embedder
(all-MiniLM-L6-v2) and compared with each of its person's persona lines: the cosine to the line it
is about ("own"), to the person's other lines, and, for each general control question of
``bench/recall.py``, the highest cosine to any of the person's lines. Then, for each threshold,
the share of questions whose own line would still reach the prompt, and the share of control
questions that would get any line at all (with no threshold, every one gets ``k`` lines).
``engram_app.inference.prompting.RETRIEVAL_MIN_SCORE`` was chosen from this table.

    python bench/retrieval_threshold.py --data ../shared/data/ --people 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recall import CONTROLS, add_people_arguments, choose_probes, people_of  # noqa: E402
from bench.results_table import publish  # noqa: E402
from engram_app.inference.prompting import RETRIEVAL_MIN_SCORE  # noqa: E402
from engram_app.ingest.embedding import Embedder  # noqa: E402

THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_people_arguments(parser, people=40, split="tuning")
    args = parser.parse_args()

    people = people_of(args.data, args.people, args.split)
    embedder = Embedder()
    controls = embedder.encode([question for question, _ in CONTROLS])
    own, first, control_max = [], 0, []
    for person in people:
        choose_probes(person, "profile")
        lines = embedder.encode(person.facts)
        for probe in person.probes:
            scores = embedder.encode([probe["prompt"]])[0] @ lines.T
            mine = scores[person.facts.index(probe["fact"])]
            own.append(mine)
            first += bool(mine >= scores.max())
        control_max += list((controls @ lines.T).max(axis=1))
    own, control_max = np.array(own), np.array(control_max)

    def spread(values: np.ndarray) -> str:
        return " | ".join(f"{v:.2f}" for v in np.percentile(values, [10, 50, 90]))

    lines = [f"`python bench/retrieval_threshold.py --data {args.data} --people {args.people} --split {args.split}`", "",
             f"{len(people)} people ({args.split} half), {len(own)} held-out questions, {len(control_max)} "
             f"(control, person) pairs. The question's own line is the nearest of its person's lines for "
             f"{first} of {len(own)}. Cosine percentiles (p10 | median | p90): own line {spread(own)}; "
             f"a control's nearest line {spread(control_max)}. The app's threshold: {RETRIEVAL_MIN_SCORE}.", "",
             "| min score | questions whose own line passes | controls given any line |", "|---|---|---|"]
    for threshold in THRESHOLDS:
        lines.append(f"| {threshold:.2f} | {(own >= threshold).mean():.2f} | {(control_max >= threshold).mean():.2f} |")
    publish(f"retrieval-threshold-{args.split}", lines)


if __name__ == "__main__":
    main()
