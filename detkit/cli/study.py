"""``detkit-study``: does SimCLR pretraining on the unlabeled images improve detection? One reproducible study.

    detkit-study [--out runs/study] [--scale 1] [--pretrain-epochs 60] [--pretrain-size 64] [--imagenet]
                 [-- HYDRA OVERRIDES FOR FINE-TUNING...]

1. Pretrains one SimCLR encoder on the training images (labels unused; random resized crops of the full images)
   with ``detkit-pretrain`` -> ``OUT/pretrain/encoder.pt`` (reused if it is already there: a study can be resumed).
2. Fine-tunes every arm of ``experiment=study_bccd`` with ``detkit-train -m`` (detector x init x label budget x
   seed, the same schedule for every arm) -> ``OUT/finetune/`` with the sweep's ``summary.csv``.
3. Reads that ``summary.csv`` (the sweep machinery's table: no hand-copied numbers) and writes
   ``OUT/study.md`` (mean +- std of AP, AP50, AP75 per arm), ``OUT/study.json`` and ``OUT/study_ap50.png``
   (AP50 vs label budget, one line per detector and init).

Pretraining arms (``--arm "NAME KEY=VALUE ..."``, repeatable): each arm pretrains its own encoder with these
``detkit-pretrain`` overrides on top of the study's (``OUT/arms/NAME/pretrain``) and fine-tunes every detector x
label budget x seed from it (``OUT/arms/NAME/finetune``, ``init=simclr`` only: the scratch arms are shared). The
table and plot list them as ``init = simclr:NAME``, each compared with the same scratch rows, e.g.::

    detkit-study --scale 10 --arm "crop_small data.crop_scale=[0.02,0.3]" --arm "tau05 model.temperature=0.5" \
        --arm "lars model.optimizer._target_=detkit.lit.lars.LARS" -- trainer=gpu

The ImageNet arm (``--imagenet``): the fine-tuning sweep adds ``init=imagenet`` beside ``scratch`` and ``simclr``,
the baseline SimCLR must beat: torchvision's ImageNet weights of the same ResNet (or timm's for a timm backbone),
reported as ``init = imagenet`` with its AP50 gain vs scratch. It needs the weights file, downloaded once into
torch's cache (``$TORCH_HOME/hub/checkpoints``); offline, each imagenet job fails with the file name and folder to
place it in, and the other arms still complete. The same arm without the study: ``detkit-train -m
experiment=study_bccd encoder=OUT/encoder.pt init=scratch,simclr,imagenet``.

Another COCO dataset: pass its paths as overrides, e.g. ``-- data.train_ann=A.json data.train_images=DIR
data.val_ann=B.json data.val_images=DIR`` (pretraining then uses those training images too).
Report only, from an existing sweep: ``detkit-study --report-only --out OUT``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
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


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with every key that ``extra`` sets replaced by ``extra``'s value (Hydra refuses a key given twice)."""
    keys = {_key(o) for o in extra}
    return [o for o in base if _key(o) not in keys] + list(extra)


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``"NAME KEY=VALUE ..."`` -> ``(NAME, [KEY=VALUE, ...])``, with a clear error for a malformed arm."""
    name, *overrides = text.split()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or "=" in name:
        raise SystemExit(f"detkit-study: --arm {text!r}: the first word must be the arm's name (letters, digits, "
                         "_ . -), e.g. --arm \"tau05 model.temperature=0.5\"")
    if not overrides or any("=" not in o for o in overrides):
        raise SystemExit(f"detkit-study: --arm {text!r}: give KEY=VALUE detkit-pretrain overrides after the name")
    return name, overrides


#: The inits of the fine-tuning sweep with ``--imagenet`` (the experiment's own are scratch and simclr).
IMAGENET_INITS = "init=scratch,simclr,imagenet"


def finetune_command(out: Path, encoder: Path, scale: int, overrides: list[str], imagenet: bool = False) -> list[str]:
    """The ``detkit-train -m experiment=study_bccd`` sweep over every arm (``imagenet``: with the ImageNet arm)."""
    extra = merge_overrides([IMAGENET_INITS], overrides) if imagenet else list(overrides)
    # The study's experiment selects the demo set (data=bccd); a user's own dataset gets the generic data config
    # instead, so it never inherits BCCD's vertical flips or its test split.
    own_data = any(o.split("=", 1)[0].lstrip("+") in ("data.train_ann", "data.train_images") for o in extra) and \
        not any(o.startswith("data=") for o in extra)
    return [_bin("detkit-train"), "-m", "experiment=study_bccd", *(["data=coco"] if own_data else []),
            f"encoder={encoder}", f"study.scale={scale}", f"hydra.sweep.dir={out}", *extra]


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


def aggregate(summary_csv: Path, init_label: str | None = None) -> list[dict[str, Any]]:
    """Group a sweep's ``summary.csv`` by arm (model, init, label budget) over seeds; ``init_label`` renames the
    sweep's ``simclr`` init (a pretraining arm's sweep: ``simclr:NAME``).

    Returns one dict per arm: ``model``, ``init``, ``fraction``, ``n`` (completed seeds), ``failed``, and for each
    of AP/AP50/AP75 the ``mean``, ``std`` (sample standard deviation; 0 for one seed) and the per-seed ``values``.
    """
    groups: dict[tuple[str, str, float], dict[str, Any]] = {}
    with summary_csv.open() as f:
        for row in csv.DictReader(f):
            ov = {**ARM_KEYS, **_job_overrides(row)}
            if init_label and ov["init"] == "simclr":
                ov["init"] = init_label
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
    """Markdown table: one row per arm, mean +- std over seeds, and the difference of AP50 to the scratch arm (for
    SimCLR, its pretraining arms and ImageNet)."""
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
                    linestyle="--" if init == "scratch" else "-", capsize=3, label=f"{model}, {init}")
    ax.set_xlabel("labeled training images (%)")
    ax.set_ylabel("val AP50 (mean ± std over seeds)")
    ax.set_title("SimCLR init vs random init" + (" and ImageNet" if any(a["init"] == "imagenet" for a in arms)
                                                  else ""))
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
    for arm_dir in sorted(p for p in (out / "arms").glob("*") if p.is_dir()):
        arm_summary = arm_dir / "finetune" / "summary.csv"
        if not arm_summary.is_file():
            continue
        arms += aggregate(arm_summary, init_label=f"simclr:{arm_dir.name}")
        spec = arm_dir / "arm.json"
        arm_info = json.loads(spec.read_text()) if spec.is_file() else {}
        arm_pre = arm_dir / "pretrain" / "pretrain_metrics.json"
        if arm_pre.is_file():
            arm_info["pretrain"] = json.loads(arm_pre.read_text())
        info.setdefault("pretraining_arms", {})[arm_dir.name] = arm_info
    arms.sort(key=lambda a: (a["model"], a["init"], a["fraction"]))
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
    p.add_argument("--arm", action="append", default=[], metavar='"NAME KEY=VALUE ..."',
                   help="a pretraining arm (repeatable): its own encoder from these detkit-pretrain overrides, "
                        "fine-tuned with init=simclr; reported as simclr:NAME")
    p.add_argument("--imagenet", action="store_true",
                   help="add the init=imagenet arm (ImageNet weights; downloads them once, see above)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every fine-tuning job (after --)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    arms = [parse_arm(a) for a in args.arm]
    if len({name for name, _ in arms}) != len(arms):
        raise SystemExit(f"detkit-study: two --arm share a name: {[name for name, _ in arms]}")
    start = time.time()
    if not args.report_only:
        def pretrain(folder: Path, extra: list[str]) -> Path:
            encoder = folder / "encoder.pt"
            if encoder.is_file():
                print(f"[detkit-study] reusing {encoder}", flush=True)
                return encoder
            cmd = merge_overrides(pretrain_command(folder, args.scale, args.pretrain_epochs, args.pretrain_size,
                                                   args.pretrain_batch, args.overrides), extra)
            print("[detkit-study]", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return encoder

        encoder = pretrain(out / "pretrain", args.pretrain_override)
        cmd = finetune_command(out / "finetune", encoder, args.scale, args.overrides, imagenet=args.imagenet)
        print("[detkit-study]", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        for name, arm_overrides in arms:
            folder = out / "arms" / name
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            extra = merge_overrides(args.pretrain_override, arm_overrides)
            arm_encoder = pretrain(folder / "pretrain", extra)
            cmd = finetune_command(folder / "finetune", arm_encoder, args.scale,
                                   merge_overrides(args.overrides, ["init=simclr"]))
            print("[detkit-study]", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            (folder / "arm.json").write_text(json.dumps({"pretrain_overrides": extra,
                                                         "wall_time_s": round(time.time() - t0, 1)}, indent=2))
    extra = {} if args.report_only else {"wall_time_s": round(time.time() - start, 1),
                                        "command": " ".join(["detkit-study", *(argv or sys.argv[1:])])}
    md = report(out, extra)
    print(md.read_text())
    print(f"[detkit-study] table: {md}\n[detkit-study] plot: {out / 'study_ap50.png'}\n"
          f"[detkit-study] per-job metrics: {out / 'finetune'}/<job>/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
