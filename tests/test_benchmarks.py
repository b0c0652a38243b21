"""The benchmarks run as documented (python -m benchmarks.X): a short run of each case
kind, so a benchmark that no longer runs fails here, not on the day it is needed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_attention_benchmark_times_involution_and_inv_xcorr_in_bf16(tmp_path):
    out = tmp_path / "attention.json"
    cases = ["involution K=7", "inv_xcorr W=4 r=1"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.attention", "--seq-lens", "16", "--repeats", "1"]
        + ["--threads", "1", "--dtype", "bfloat16", "--paths", "fast", "--cases", *cases]
        + ["--batch", "1", "--heads", "2", "--head-dim", "16", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads(out.read_text())
    assert saved["settings"]["dtype"] == "bfloat16"
    rows = {r["case"]: r for r in saved["results"]}
    assert set(rows) == {"dot", *cases, "scipy_detached"}
    for case in cases:
        assert rows[case]["status"] == "ok" and rows[case]["time_vs_dot"] > 0
        assert f"{case} (fast)" in saved["faster_than_dot_from"]
    assert "Faster than dot from T =" in done.stdout
