"""tools/bench_latency.py on the tiny exports: prompt timings for every style, decode where cached."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_latency  # noqa: E402


def test_prompt_and_decode_timings(tiny, capsys):
    genai = str(tiny("genai-fp32"))
    assert bench_latency.main([genai, genai, "--prompt", "8", "--decode-past", "4", "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith(f"| {genai}")]
    assert len(rows) == 2
    cells = rows[0].strip("|").split("|")
    # model, prompt ms, decode ms, prompt ratio, decode ratio: the baseline's ratios are 1.
    assert len(cells) == 5 and float(cells[3]) == 1.0 and float(cells[4]) == 1.0
    assert float(cells[1]) > 0 and float(cells[2]) > 0


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert bench_latency.main([str(tmp_path / "absent.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model not found") and "\n" not in err
