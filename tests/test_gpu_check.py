"""``bench/gpu_check.py``, the one command that proves the app on a GPU, runs end to end on the CPU.

On a tiny model its five checks (agreement, memory on/off decode, Engram vs LoRA step, host vs
device table, peak memory) each report a figure, the baseline measured in the same run and
their ratio, in the JSON object and in the markdown table.
"""

from __future__ import annotations

import json
import math

from bench import gpu_check

KEYS = {"what", "figure", "baseline", "unit", "ratio"}


def test_the_gpu_check_runs_its_five_checks_on_the_cpu_and_reports_finite_positive_ratios(capsys):
    assert gpu_check.main(["--device", "cpu", "--model", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["device"].startswith("CPU") and report["model"] == "tiny random Llama (tests)"
    assert list(report["checks"]) == list(gpu_check.CHECKS) == [
        "top1_agreement", "memory_on_off_decode", "engram_lora_step", "host_table_decode", "peak_memory"]
    for key, row in report["checks"].items():
        assert set(row) == KEYS, key
        for number in (row["figure"], row["baseline"], row["ratio"]):
            assert math.isfinite(number) and number > 0, (key, row)
        assert math.isclose(row["ratio"], row["figure"] / row["baseline"]), key
    agreement = report["checks"]["top1_agreement"]
    assert 0 < agreement["figure"] <= 1 and agreement["baseline"] == 1.0
    assert "bfloat16" in agreement["what"]
    assert report["checks"]["peak_memory"]["unit"] == "MiB"

    table = gpu_check.markdown(report)
    assert table[2:4] == ["| check | figure | baseline | ratio |", "|---|---:|---:|---:|"]
    rows = table[4:]
    assert len(rows) == 5
    for line, key in zip(rows, gpu_check.CHECKS):
        assert line.startswith(f"| {report['checks'][key]['what']} |")
        assert line.endswith(f"| {report['checks'][key]['ratio']:.3f}x |")
