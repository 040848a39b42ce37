"""``detkit-study``: does SimCLR pretraining on the unlabeled images improve detection? One reproducible study.

    detkit-study [--out runs/study] [--scale 1] [--pretrain-epochs 60] [--pretrain-size 64]
                 [-- HYDRA OVERRIDES FOR FINE-TUNING...]

1. Pretrains one SimCLR encoder on the training images (labels unused; random resized crops of the full images)
   with ``detkit-pretrain`` -> ``OUT/pretrain/encoder.pt`` (reused if it is already there: a study can be resumed).
2. Fine-tunes every arm of ``experiment=study_bccd`` with ``detkit-train -m`` (detector x init x label budget x
   seed, the same schedule for every arm) -> ``OUT/finetune/`` with the sweep's ``summary.csv``.
3. Reads that ``summary.csv`` (the sweep machinery's table: no hand-copied numbers) and writes
   ``OUT/study.md`` (mean +- std of AP, AP50, AP75 per arm), ``OUT/study.json`` and ``OUT/study_ap50.png``
   (AP50 vs label budget, one line per detector and init).

Another COCO dataset: pass its paths as overrides, e.g. ``-- data.train_ann=A.json data.train_images=DIR
data.val_ann=B.json data.val_images=DIR`` (pretraining then uses those training images too).
Report only, from an existing sweep: ``detkit-study --report-only --out OUT``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = ("AP", "AP50", "AP75")
#: Arm keys read from a sweep's ``overrides`` column, with the value used when the sweep did not vary them.
ARM_KEYS = {"model": "faster_rcnn", "init": "scratch", "data.train_fraction": "1.0"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _data_overrides(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if o.startswith("data.") and "=" in o)


def pretrain_command(out: Path, scale: int, epochs: int, image_size: int, batch_size: int,
                     overrides: list[str]) -> list[str]:
    """The ``detkit-pretrain`` call: SimCLR on the fine-tuning set's training images (labels unused)."""
    data = _data_overrides(overrides)
    cmd = [_bin("detkit-pretrain"), f"hydra.run.dir={out}", f"trainer.max_epochs={epochs * scale}",
           f"data.image_size={image_size}", f"data.batch_size={batch_size}"]
    if "data.train_images" in data:
        cmd.append(f"data.images={data['data.train_images']}")
    else:
        cmd.append("data.images=${detkit_data:}/bccd/images")
    cmd.append(f"data.ann_file={data.get('data.train_ann', '${detkit_data:}/bccd/annotations/train.json')}")
    return cmd


def finetune_command(out: Path, encoder: Path, scale: int, overrides: list[str]) -> list[str]:
    """The ``detkit-train -m experiment=study_bccd`` sweep over every arm."""
    return [_bin("detkit-train"), "-m", "experiment=study_bccd", f"encoder={encoder}", f"study.scale={scale}",
            f"hydra.sweep.dir={out}", *overrides]


def parse_overrides(text: str) -> dict[str, str]:
    """``"model=yolo init=simclr seed=1"`` -> ``{"model": "yolo", "init": "simclr", "seed": "1"}``."""
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _job_overrides(row: dict[str, str]) -> dict[str, str]:
    """All overrides of a sweep job: the summary's column keeps only those that vary between jobs, so a setting
    shared by every job (e.g. ``data.train_fraction=0.25`` for all) is read back from the job's own status file."""
    status = Path(row.get("output_dir") or "") / "job_status.json"
    if row.get("output_dir") and status.is_file():
        return parse_overrides(" ".join(json.loads(status.read_text())["overrides"]))
    return parse_overrides(row["overrides"])


def aggregate(summary_csv: Path) -> list[dict[str, Any]]:
    """Group a sweep's ``summary.csv`` by arm (model, init, label budget) over seeds.

    Returns one dict per arm: ``model``, ``init``, ``fraction``, ``n`` (completed seeds), ``failed``, and for each
    of AP/AP50/AP75 the ``mean``, ``std`` (sample standard deviation; 0 for one seed) and the per-seed ``values``.
    """
    groups: dict[tuple[str, str, float], dict[str, Any]] = {}
    with summary_csv.open() as f:
        for row in csv.DictReader(f):
            ov = {**ARM_KEYS, **_job_overrides(row)}
            key = (ov["model"], ov["init"], float(ov["data.train_fraction"]))
            arm = groups.setdefault(key, {"values": defaultdict(list), "failed": 0, "seeds": []})
            if row["status"] != "completed" or not row["AP"]:
                arm["failed"] += 1
                continue
            arm["seeds"].append(ov.get("seed", ""))
            for m in METRICS:
                arm["values"][m].append(float(row[m]))
    arms = []
    for (model, init, fraction), g in sorted(groups.items()):
        arm: dict[str, Any] = {"model": model, "init": init, "fraction": fraction, "n": len(g["seeds"]),
                               "failed": g["failed"], "seeds": g["seeds"]}
        for m in METRICS:
            vals = g["values"][m]
            arm[m] = {"mean": statistics.fmean(vals) if vals else math.nan,
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}
        arms.append(arm)
    return arms


def table(arms: list[dict[str, Any]]) -> str:
    """Markdown table: one row per arm, mean +- std over seeds, and the SimCLR - scratch difference of AP50."""
    lines = ["| detector | init | labels | seeds | AP | AP50 | AP75 | AP50 gain vs scratch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_key = {(a["model"], a["init"], a["fraction"]): a for a in arms}
    for a in arms:
        cells = [f"{a[m]['mean']:.3f} ± {a[m]['std']:.3f}" for m in METRICS]
        base = by_key.get((a["model"], "scratch", a["fraction"]))
        gain = "" if a["init"] == "scratch" or base is None else f"{a['AP50']['mean'] - base['AP50']['mean']:+.3f}"
        seeds = f"{a['n']}" + (f" ({a['failed']} failed)" if a["failed"] else "")
        lines.append(f"| {a['model']} | {a['init']} | {a['fraction']:.0%} | {seeds} | " + " | ".join(cells)
                     + f" | {gain} |")
    return "\n".join(lines) + "\n"


def plot(arms: list[dict[str, Any]], path: Path) -> Path:
    """AP50 (mean +- std over seeds) vs label budget, one line per detector and init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    lines = sorted({(a["model"], a["init"]) for a in arms})
    for model, init in lines:
        pts = sorted((a["fraction"], a["AP50"]["mean"], a["AP50"]["std"]) for a in arms
                     if a["model"] == model and a["init"] == init)
        xs, ys, es = zip(*pts)
        ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o" if model == "faster_rcnn" else "s",
                    linestyle="-" if init == "simclr" else "--", capsize=3, label=f"{model}, {init}")
    ax.set_xlabel("labeled training images (%)")
    ax.set_ylabel("val AP50 (mean ± std over seeds)")
    ax.set_title("SimCLR init vs random init")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``study.md``, ``study.json`` and ``study_ap50.png`` from ``OUT/finetune/summary.csv``."""
    summary = out / "finetune" / "summary.csv"
    if not summary.is_file() and (out / "finetune").is_dir():
        # an interrupted sweep (or one still running): tabulate the jobs that recorded a status so far
        from detkit.cli.sweep import collect_rows, write_tables

        rows = collect_rows(out / "finetune")
        if rows:
            write_tables(rows, out / "finetune")
    if not summary.is_file():
        raise FileNotFoundError(f"{summary} does not exist: run the fine-tuning sweep first")
    arms = aggregate(summary)
    info = dict(extra or {})
    pre = out / "pretrain" / "pretrain_metrics.json"
    if pre.is_file():
        info["pretrain"] = json.loads(pre.read_text())
    (out / "study.json").write_text(json.dumps({"arms": arms, **info}, indent=2))
    png = plot(arms, out / "study_ap50.png")
    md = out / "study.md"
    md.write_text(f"# Pretraining study ({summary})\n\n{table(arms)}\n![AP50 vs label budget]({png.name})\n")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="detkit-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="study folder (pretrain/, finetune/, study.md)")
    p.add_argument("--scale", type=int, default=1,
                   help="multiplies pretraining epochs and fine-tuning steps (1: ~2 h on 2 CPU cores)")
    p.add_argument("--pretrain-epochs", type=int, default=60, help="SimCLR epochs at scale 1")
    p.add_argument("--pretrain-size", type=int, default=64, help="SimCLR view size (px)")
    p.add_argument("--pretrain-batch", type=int, default=64)
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra detkit-pretrain override (repeatable), e.g. model.temperature=0.5")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every fine-tuning job (after --)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    start = time.time()
    if not args.report_only:
        encoder = out / "pretrain" / "encoder.pt"
        if encoder.is_file():
            print(f"[detkit-study] reusing {encoder}", flush=True)
        else:
            cmd = pretrain_command(out / "pretrain", args.scale, args.pretrain_epochs, args.pretrain_size,
                                   args.pretrain_batch, args.overrides) + args.pretrain_override
            print("[detkit-study]", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        cmd = finetune_command(out / "finetune", encoder, args.scale, args.overrides)
        print("[detkit-study]", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    extra = {} if args.report_only else {"wall_time_s": round(time.time() - start, 1),
                                        "command": " ".join(["detkit-study", *(argv or sys.argv[1:])])}
    md = report(out, extra)
    print(md.read_text())
    print(f"[detkit-study] table: {md}\n[detkit-study] plot: {out / 'study_ap50.png'}\n"
          f"[detkit-study] per-job metrics: {out / 'finetune'}/<job>/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
