"""tools/paper_table.py's arithmetic: the rank correlation it reports and the chance level of a task."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import paper_table  # noqa: E402


def test_spearman_is_the_correlation_of_ranks():
    assert paper_table.spearman([0.1, 0.3, 0.2, 0.9], [1, 5, 2, 7]) == pytest.approx(1.0)
    assert paper_table.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap among five: 1 - 6 * 2 / (5 * 24) = 0.9 (the textbook formula, no ties)
    assert paper_table.spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.9)
    # ties share the mean of their ranks: x ranks (0.5, 0.5, 2), y ranks (0, 1, 2)
    assert paper_table.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])


def test_chance_is_the_mean_of_one_over_the_choices(tmp_path):
    lines = [{"doc_id": d, "idx": i, "label": 0, "request": {"context": "q", "continuation": f" {i}"}}
             for d, n in ((0, 2), (1, 4), (2, 4)) for i in range(n)]  # fmt: skip
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert paper_table.chance(tmp_path, 10) == {"t": pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)}


def test_sanity_line_counts_standard_errors_above_chance(tmp_path):
    """(acc_norm - chance) / its standard error, per sanity task; the folder links the three tasks only."""
    ref = {"tasks": {n: {"acc_norm": 0.55, "acc_norm_stderr": 0.02} for n in paper_table.SANITY}}
    line = paper_table.sanity_line(ref, {"arc_easy": 0.25, "hellaswag": 0.25, "piqa": 0.5}, 600)
    assert "arc_easy 55.0% ± 2.0 (chance 25%: 15.0 SE above)" in line and "piqa 55.0% ± 2.0 (chance 50%: 2.5 SE above)" in line
    tasks = tmp_path / "tasks"
    for name in (*paper_table.SANITY, "boolq"):
        (tasks / name).mkdir(parents=True)
        (tasks / name / "requests.jsonl.gz").write_bytes(b"")
    sub = paper_table.sanity_tasks(tasks, tmp_path / "work")
    assert sorted(p.name for p in sub.iterdir()) == sorted(paper_table.SANITY)
    assert (sub / "piqa" / "requests.jsonl.gz").resolve() == (tasks / "piqa" / "requests.jsonl.gz").resolve()
