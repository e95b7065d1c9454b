"""Import speed of the memory library: files/s and MB/s for plain text and PDF files.

Makes the files in a temporary folder (text from a fixed word list; PDFs with fpdf2), imports them
into a temporary data root with the bundled model's tokenizer and the MiniLM index, and reports
the whole import and, to show where the time goes, parsing alone (ratio = parse-only speed over
full-import speed).

    python bench/ingest_speed.py [--text-files 200] [--pdf-files 30]

Writes bench/results/ingest_speed.md.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engram_app.ingest import Library  # noqa: E402
from engram_app.ingest.detect import parse_bytes  # noqa: E402
from engram_app.service import Service  # noqa: E402
from engram_app.settings import Settings  # noqa: E402
from engram_app.store import open_db  # noqa: E402
from results_table import publish  # noqa: E402

WORDS = ("memory table model token garden river morning letter meeting travel kitchen music friend city "
         "project report harbour window market winter summer language book train coffee school").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."


def make_files(folder: Path, text_files: int, pdf_files: int) -> tuple[list[Path], list[Path]]:
    from fpdf import FPDF

    rng = random.Random(0)
    texts, pdfs = [], []
    for i in range(text_files):
        path = folder / "text" / f"note{i:04}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(" ".join(sentence(rng) for _ in range(8)) for _ in range(25)))
        texts.append(path)
    for i in range(pdf_files):
        pdf = FPDF()
        pdf.set_font("helvetica", size=11)
        for _ in range(5):
            pdf.add_page()
            pdf.multi_cell(0, 6, " ".join(sentence(rng) for _ in range(40)))
        path = folder / "pdf" / f"doc{i:03}.pdf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(pdf.output()))
        pdfs.append(path)
    return texts, pdfs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-files", type=int, default=200)
    parser.add_argument("--pdf-files", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tokenizer = Service(Settings()).tokenizer()
    lines = [
        "Import speed, bundled tokenizer + all-MiniLM-L6-v2 index on CPU.",
        "",
        "| files | count | MB | full import files/s | full import MB/s | parse only files/s | parse-only / full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        texts, pdfs = make_files(folder / "in", args.text_files, args.pdf_files)
        library = Library(open_db(folder / "home"), folder / "home", tokenizer)
        library.embedder.encode(["warm up"])
        for label, paths in (("plain text", texts), ("PDF", pdfs)):
            megabytes = sum(p.stat().st_size for p in paths) / 2**20
            started = time.perf_counter()
            for path in paths:
                parse_bytes(path.read_bytes(), path.name)
            parse_seconds = time.perf_counter() - started
            started = time.perf_counter()
            results = library.ingest(paths)
            seconds = time.perf_counter() - started
            assert all(r.status == "added" for r in results), [r.reason for r in results if r.status != "added"][:3]
            lines.append(
                f"| {label} | {len(paths)} | {megabytes:.1f} | {len(paths) / seconds:.1f} | {megabytes / seconds:.2f} "
                f"| {len(paths) / parse_seconds:.0f} | {seconds / parse_seconds:.0f}x |"
            )
            print(lines[-1], flush=True)
    publish("ingest_speed", lines)


if __name__ == "__main__":
    main()
