"""Smoke test of the performance benchmarks: each script runs end to end on tiny shapes and prints its table.

The benchmarks themselves are not tests (benchmarks/RESULTS.md holds their numbers); this only checks
that `python benchmarks/X.py --smoke` still works and writes its results section and plot where told.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {
    # script: (table header start, data rows the smoke run prints, results section)
    "layer.py": ("| in=out | tokens | E | routing | dtype | base ms | moe ms |", 4, "layer"),
    "optimizer.py": ("| dtype | tokens | layers | adamw ms/step | riemannian ms/step |", 2, "optimizer"),
}


def test_benchmark_scripts_smoke(tmp_path):
    pytest.importorskip("peft", reason="benchmarks/layer.py compares against PEFT (the `bench` extra)")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running = {}
    for script in SCRIPTS:  # both at once: each is one thread and mostly import time
        plot = tmp_path / script.replace(".py", ".png")
        out = tmp_path / f"{script}.out"
        cmd = [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--results",
               str(tmp_path / f"{script}.md"), "--plot", str(plot)]
        running[script] = (subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out.open("w"),
                                            stderr=subprocess.STDOUT), out, plot)
    for script, (proc, out, plot) in running.items():
        assert proc.wait(timeout=120) == 0, f"{script} --smoke failed:\n{out.read_text()[-4000:]}"
        header, n_rows, section = SCRIPTS[script]
        lines = out.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
        assert start is not None, f"{script}: no table printed:\n{out.read_text()[-2000:]}"
        rows = [line for line in lines[start + 1:start + 1 + n_rows] if line.startswith("| ")]
        assert len(rows) == n_rows, f"{script}: expected {n_rows} table rows:\n{out.read_text()[-2000:]}"
        assert all(line.count("|") == lines[start].count("|") for line in rows)
        written = (tmp_path / f"{script}.md").read_text()
        assert f"<!-- BEGIN {section} -->" in written and header in written and "Command: `python" in written
        assert plot.stat().st_size > 1000


def test_results_sections_are_replaced_not_duplicated(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_utils import update_results
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    path = tmp_path / "RESULTS.md"
    update_results(path, "a", "first A")
    update_results(path, "b", "only B")
    update_results(path, "a", "second A")
    text = path.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.count("<!-- BEGIN a -->") == 1 and text.index("second A") < text.index("only B")
