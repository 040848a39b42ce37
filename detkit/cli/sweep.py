"""Multirun bookkeeping: each job records its outcome; one table (CSV + Markdown) is written when a sweep ends.

Hydra's basic sweeper re-raises a job's exception after its batch and then skips ``on_multirun_end``, so one failed
job would erase the summary of all the others. detkit's entry points therefore catch a job's error in multirun
mode (:func:`detkit.cli.common.clean_errors`), record it with :func:`write_job_status`, and return NaN (which an
Optuna sweep records as a failed trial); :class:`SweepSummary` then tabulates every job of the sweep.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("detkit")
STATUS_FILE = "job_status.json"
COLUMNS = ("job", "overrides", "status", "AP", "AP50", "AP75", "AR100", "wall_time_s", "output_dir", "error")


def write_job_status(out: Path, status: str, wall_time_s: float, error: str | None = None) -> None:
    """Write ``out/job_status.json``: the job's overrides, status, wall time and error message."""
    hc = HydraConfig.get()
    out.mkdir(parents=True, exist_ok=True)
    (out / STATUS_FILE).write_text(json.dumps({
        "job": hc.job.num, "overrides": list(hc.overrides.task), "status": status,
        "wall_time_s": round(wall_time_s, 1), "error": error}))


def _row(status_file: Path) -> dict[str, Any]:
    row = json.loads(status_file.read_text())
    metrics_file = status_file.parent / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    for key in ("AP", "AP50", "AP75", "AR100"):
        row[key] = metrics.get(key)
    row["output_dir"] = str(status_file.parent)
    return row


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a sweep that recorded its status, in job order. The ``overrides`` column keeps
    only what differs between jobs (overrides shared by every job are the sweep's fixed settings)."""
    rows = sorted((_row(f) for f in sweep_dir.rglob(STATUS_FILE)),
                  key=lambda r: (r["job"] if r["job"] is not None else math.inf))
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in shared)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` into the sweep directory."""
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, tabulate every job (completed or failed) of the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_rows(sweep_dir)
        if not rows:
            return
        csv_path, md_path = write_tables(rows, sweep_dir)
        failed = sum(r["status"] != "completed" for r in rows)
        log.info("sweep summary (%d jobs, %d failed): %s and %s", len(rows), failed, csv_path, md_path)
