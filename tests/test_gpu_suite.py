"""bench/gpu_suite.py --smoke: every section of the GPU suite runs its code paths on the CPU with
tiny shapes, so the one command a lent GPU gets cannot rot between GPUs."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.tiny import REPO


def test_the_gpu_suite_runs_every_section_on_a_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["tests", "check", "real_text", "cached_step", "compile", "recipe", "input", "auto", "loss", "decoder"]
    for name, section in sections.items():
        assert "rows" in section and section["rows"], (name, section)
    methods = {r["method"] for r in sections["real_text"]["rows"]}
    assert methods == {"floor", "ours", "ours-fixed", "st-tokens"}, methods
    assert all("error" not in r for r in sections["real_text"]["rows"])
    recipe = sections["recipe"]["rows"][0]
    assert recipe["steps"] == 2 and 0 <= recipe["ndcg_before"] <= 1 and 0 <= recipe["ndcg_after"] <= 1
    assert sections["tests"]["rows"][0]["exit_code"] == 0
    assert [r["asked"] for r in sections["auto"]["rows"]][-1] == "auto" and sections["auto"]["rows"][-1]["chunk_tokens"] > 0
    assert sections["input"]["rows"][0]["x_gpu_step"] > 0
    assert sections["check"]["rows"][0]["ok"] and sections["check"]["rows"][0]["exit_code"] == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "## real_text" in markdown and "| st-tokens |" in markdown and "## recipe" in markdown
    assert "failed" not in markdown
