"""The one-call GPU session (``bash scripts/gpu_session.sh all``, issue 33) as a dry run: every stage on tiny CPU
inputs through the same shell entry, stage runner and report, so the script a lent GPU gets cannot rot unseen.
About 75 s on 2 idle CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

from tests.helpers import ROOT

STAGES = ["eager", "nms", "simclr", "tests", "compiled-8", "compiled-32"]


def test_the_gpu_session_dry_run_runs_every_stage_and_prints_one_markdown_block(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("DRY_RUN", None)
    r = subprocess.run(["bash", "scripts/gpu_session.sh", "all", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    block_file = out / "BENCHMARKS_block.md"
    assert block_file.is_file(), r.stderr[-3000:]
    block = block_file.read_text()
    assert r.returncode == 0, block + r.stderr[-3000:]
    assert r.stdout.rstrip().endswith(block.rstrip())  # the block is what the call prints last
    assert block.startswith("## GPU session (issue 33): CPU (dry run)")
    for stage in STAGES:
        assert f"\n| {stage} | " in block and f"\n### {stage}: " in block, stage
    for word in ("FAILED", "TIMED OUT", "NOT RUN"):
        assert word not in block, block
    assert "### Goals" in block and "torch " in block

    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] and list(results["stages"]) == STAGES
    stages = results["stages"]
    assert all(s["status"] == "ok" for s in stages.values()), {n: s["status"] for n, s in stages.items()}
    assert {r["impl"] for r in stages["eager"]["rows"]} == {"detkit", "torchvision", "yolo"}
    for name in ("compiled-8", "compiled-32"):
        assert stages[name]["rows"] and all(r["compile"] and r["compile_mode"] == "reduce-overhead"
                                            for r in stages[name]["rows"])
    assert len(stages["nms"]["rows"]) == 3 and all(r["same_boxes"] for r in stages["nms"]["rows"])
    assert stages["simclr"]["rows"] and stages["simclr"]["rows"][0]["impl"] == "detkit (device views)"
    assert stages["tests"]["rows"][0]["passed"] > 0 and not stages["tests"]["rows"][0]["failed"]

    # what comes back from the device: a few plain files directly under $OUT, the logs packed in one archive
    files = sorted(p.name for p in out.iterdir())
    assert files == ["BENCHMARKS_block.md", "device.txt", "logs.tar.gz", "results.json"], files
    with tarfile.open(out / "logs.tar.gz") as t:
        names = set(t.getnames())
    assert {f"logs/{s}.{ext}" for s in STAGES for ext in ("cmd", "out", "err")} <= names
