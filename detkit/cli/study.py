"""``detkit-study``: do unlabeled images help detection here? One reproducible study (issue 29 item 4, issue 32 item 4).

    detkit-study [--preset full|cpu|gpu] [--out runs/study] [--ssl simclr,densecl] [--semi-inits scratch,simclr]
                 [--scale 1] [--pretrain-epochs N] [--pretrain-size PX] [--pretrain-batch B]
                 [--pretrain-crop-scale LO,HI] [--pretrain-override KEY=VALUE]... [--pretrain-pool train+test|train|all]
                 [--arm "NAME KEY=VALUE ..."]... [--imagenet] [--budget-s S] [--loss-margin NATS]
                 [--report-only] [-- HYDRA OVERRIDES FOR FINE-TUNING...]

The arms: init scratch / SimCLR / DenseCL x both detectors x label budget x seed, and, at each budget below 100%,
self-training (``semi=teacher``) from scratch and from the SimCLR encoder (``--semi-inits``); every arm on the same
fixed-step schedule of ``experiment=study_bccd`` (or the preset's), evaluated once after its last step on the val split.

1. **Unlabeled sets** (``OUT/unlabeled/``, labels unused):
   ``pretrain_pool.json``, the pretraining pool: the train and test images. Never the val images the detectors are
   scored on: pretraining on them would be transductive (the encoder would have seen the very images of the score).
   ``--pretrain-pool train`` uses the train images only; ``--pretrain-pool all`` adds val, and the report says so.
   ``train_complement_f10_s0.json``: the train images *outside* the labeled subset of a budget (the subset the data
   module draws: ``data.train_fraction`` with ``data.subset_seed``, drawn here by the same code; a val image listed
   in train left out, as from the pool), the unlabeled images of self-training at that budget
   (``semi.unlabeled_ann``; their labels only measure the pseudo-labels' precision).
2. **Pretraining**: one ``detkit-pretrain -m pretrain_job=simclr,densecl`` multirun on the pool, the loss logged every
   step -> ``OUT/pretrain/{simclr,densecl}/encoder.pt`` (an encoder already there is reused: a study resumes).
3. **Fine-tuning**: one ``detkit-train -m`` sweep per encoder file (``encoder=`` is the one file ``init=simclr`` and
   ``init=densecl`` read), each in its own folder with the sweep machinery's ``summary.csv``: ``finetune/``
   (init=scratch,simclr), ``finetune_densecl/`` (init=densecl), ``finetune_semi_f10/`` (semi=teacher, init=scratch,
   simclr at the 10% budget; ``_densecl`` for a DenseCL init). Seeds vary slowest, so a sweep cut short (``--budget-s``)
   has every arm at fewer seeds rather than some arms missing.
4. **Report** from those sweeps (no hand-copied numbers; each ``summary.csv`` rebuilt from its job folders, the
   jobs expected read from its ``multirun.yaml`` or the study's plan): ``OUT/study.md`` (the checks, then the table:
   mean and 95% t-interval per arm, the seeds completed of those expected with the failed and missing ones, and
   the AP50 gain vs scratch with Welch's 95% interval), ``OUT/study.json`` (every seed's value),
   ``OUT/study_ap50.png`` (AP50 vs label budget) and ``OUT/study_pretrain_loss.png`` (each pretraining's loss per
   step against its chance level ln(2B-1), B the batch or the pool's size if smaller). Two checks come first: every
   pretraining ended ``--loss-margin`` nats (default 1) or more below chance, and scratch at 100% of the labels
   beats scratch at each smaller budget (the schedule is long enough for labels to matter).

Presets (``--preset``; any flag given explicitly wins):

* ``full`` (default): ``experiment=study_bccd``: 2 detectors x scratch/SimCLR/DenseCL x 10%/100% x 5 seeds + 2 x
  self-training from scratch/SimCLR at 10% x 5 seeds = 80 fine-tunings (batch 16, 150 steps), 2 pretrainings (200
  epochs of 64 px views cropped from 40-100% of the image, batch 64, on 277 images). Sized for the GPU; the reduced CPU version is ``cpu``.
* ``cpu`` (``make study-cpu``, 75 minutes on 2 idle CPU cores): ``experiment=study_bccd_cpu``: YOLO x
  scratch/SimCLR x 5%/100% x 5 seeds = 20 fine-tunings (batch 4, 300 steps) and one SimCLR pretraining of 200
  epochs: it shows the two checks (pretraining loss well below chance; scratch at 100% beats 5%) and SimCLR's
  effect on YOLO.
* ``gpu`` (``bash scripts/gpu_session.sh study``, one device call of at most 8 minutes): the ``full`` study with
  ``experiment=study_bccd_gpu`` (trainer=gpu, fp32, no loader workers) and the jobs side by side on the one GPU
  through Hydra's joblib launcher (``pip install "detkit[study-gpu]"``): ``hydra/launcher=joblib
  hydra.launcher.n_jobs=20`` for the fine-tuning sweeps (40/20/20 jobs: whole rounds), ``n_jobs=2`` for the two
  pretrainings (views made on the GPU); ``--budget-s 450``.

A rerun into the same ``--out`` reuses what is done: each pretraining whose ``encoder.pt`` exists and each
fine-tuning sweep whose planned jobs all completed (:func:`sweep_complete`), so adding ``--semi-inits`` or ``--ssl
densecl`` to a finished study trains only the new sweeps, and a study cut short reruns only its unfinished ones.

``--budget-s S``: everything ends within S seconds: a stage still running at S - 20 s is stopped (its whole process
group) and the report is written from the jobs that completed, the stopped stages named in it.

Pretraining arms (``--arm "NAME KEY=VALUE ..."``, repeatable): each pretrains its own encoder with these
``detkit-pretrain`` overrides on top of the study's (``OUT/arms/NAME/pretrain``) and fine-tunes every detector x label
budget x seed from it (``OUT/arms/NAME/finetune``; with ``pretrain_job=densecl`` among its overrides, ``init=densecl``).
The table lists them as ``init = simclr:NAME`` (or ``densecl:NAME``), compared with the shared scratch rows, e.g.::

    detkit-study --arm "crop_small data.crop_scale=[0.02,0.3]" --arm "tau05 model.temperature=0.5"

The ImageNet arm (``--imagenet``): the SimCLR sweep adds ``init=imagenet``, the baseline self-supervision must beat
(torchvision's weights of the same ResNet, downloaded once into ``$TORCH_HOME/hub/checkpoints``; offline, each imagenet
job fails naming the file, the other arms complete). The transfer recipe is a dimension too: ``-- transfer=none,ssl``
sweeps it and the table separates the rows (default ``none``).

Another COCO dataset: pass its paths as overrides, e.g. ``-- data.train_ann=A.json data.train_images=DIR
data.val_ann=B.json data.val_images=DIR [data.test_ann=C.json data.test_images=DIR]`` (pretraining then uses those
train and test images). Report only, from existing sweeps: ``detkit-study --report-only --out OUT`` (the earlier
run's command, stages, unlabeled sets and planned sweeps kept from its ``study.json``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback

from detkit.cli.sweep import STATUS_FILE

METRICS = ("AP", "AP50", "AP75")
#: Arm keys read from a sweep's ``overrides`` column, with the value used when the sweep did not vary them.
ARM_KEYS = {"model": "faster_rcnn", "init": "scratch", "semi": "none", "transfer": "none",
            "data.train_fraction": "1.0"}
#: Self-supervised pretraining methods (``detkit-pretrain pretrain_job=NAME``, fine-tuned with ``init=NAME``).
SSL_METHODS = ("simclr", "densecl")
#: Table order of the inits (others after them, alphabetically).
INIT_ORDER = {"scratch": 0, "simclr": 1, "densecl": 2, "imagenet": 3}
LEVEL = 0.95
#: Seconds kept for the report when ``--budget-s`` is set, and the least a stage is started with.
REPORT_RESERVE_S, MIN_STAGE_S = 20, 15

#: Hydra's joblib launcher (loky workers), with the callback that lets a job's data loaders start their workers there.
_JOBLIB = ["hydra/launcher=joblib", "+hydra.callbacks.loader_workers._target_=detkit.cli.study.ForkLoaderWorkers"]
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"experiment": "study_bccd", "ssl": "simclr,densecl", "semi_inits": "scratch,simclr",
             "pretrain_epochs": 200, "pretrain_size": 64, "pretrain_batch": 64, "pretrain_crop_scale": "0.4,1.0",
             "pretrain_overrides": [], "pretrain_launcher": [], "sweep_launcher": [], "budget_s": None},
    "cpu": {"experiment": "study_bccd_cpu", "ssl": "simclr", "semi_inits": "none",
            "pretrain_epochs": 200, "pretrain_size": 64, "pretrain_batch": 64, "pretrain_crop_scale": "0.4,1.0",
            "pretrain_overrides": [], "pretrain_launcher": [], "sweep_launcher": [], "budget_s": None},
    "gpu": {"experiment": "study_bccd_gpu", "ssl": "simclr,densecl", "semi_inits": "scratch,simclr",
            "pretrain_epochs": 200, "pretrain_size": 64, "pretrain_batch": 64, "pretrain_crop_scale": "0.4,1.0",
            "pretrain_overrides": ["trainer.accelerator=gpu", "data.augment_on=device", "data.num_workers=0"],
            "pretrain_launcher": [*_JOBLIB, "hydra.launcher.n_jobs=2"],
            "sweep_launcher": [*_JOBLIB, "hydra.launcher.n_jobs=20"], "budget_s": 450},
}


class ForkLoaderWorkers(Callback):
    """Hydra callback for jobs run by the joblib launcher: a loky worker process forces its start method to "loky"
    (multiprocessing's ``_bootstrap``), and a torch ``DataLoader`` with workers then fails to start them
    ("'Process' object has no attribute 'env'"). Before each job, this sets the worker's start method back to
    Linux's "fork" (what the loader would use in a plain process). Elsewhere it changes nothing."""

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        import multiprocessing

        if multiprocessing.get_start_method(allow_none=True) == "loky" and sys.platform.startswith("linux"):
            multiprocessing.set_start_method("fork", force=True)


def _bin(name: str) -> str:
    """A detkit console script: beside this interpreter (a virtual environment), else on PATH (a system Python whose
    pip puts scripts elsewhere, e.g. /usr/local/bin)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name) or str(here)


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


def arm_method(overrides: list[str]) -> str:
    """The pretraining method of an arm's overrides (``pretrain_job=densecl`` -> densecl; default simclr)."""
    jobs = [o.split("=", 1)[1] for o in overrides if _key(o) == "pretrain_job"]
    return jobs[-1] if jobs else "simclr"


#: The inits of the SimCLR sweep with ``--imagenet`` (the experiment's own are scratch and simclr).
IMAGENET_INITS = "init=scratch,simclr,imagenet"


def _own_data(overrides: list[str]) -> bool:
    """A user's own dataset (its paths given, no data group chosen): the generic data config, never BCCD's."""
    return any(_key(o) in ("data.train_ann", "data.train_images") for o in overrides) and \
        not any(o.startswith("data=") for o in overrides)


def finetune_command(out: Path, encoder: Path | None, scale: int, overrides: list[str], imagenet: bool = False,
                     experiment: str = "study_bccd", launcher: Sequence[str] = ()) -> list[str]:
    """One ``detkit-train -m experiment=EXPERIMENT`` sweep into ``out`` (``imagenet``: the SimCLR sweep with the
    ImageNet arm; ``launcher``: e.g. ``hydra/launcher=joblib hydra.launcher.n_jobs=20``)."""
    extra = merge_overrides([IMAGENET_INITS], overrides) if imagenet else list(overrides)
    # The study's experiment selects the demo set (data=bccd); a user's own dataset gets the generic data config
    # instead, so it never inherits BCCD's vertical flips or its test split.
    return [_bin("detkit-train"), "-m", f"experiment={experiment}", *(["data=coco"] if _own_data(extra) else []),
            *([f"encoder={encoder}"] if encoder is not None else []), f"study.scale={scale}",
            f"hydra.sweep.dir={out}", *launcher, *extra]


# ---------------------------------------------------------------------------------------------------- statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df`` (real, > 0) degrees of freedom."""
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`), e.g.
    ``t_quantile(0.975, 4) = 2.7764``."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean and the ``level`` t-interval over seeds: ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` (s: the sample
    standard deviation). One value: no interval (``half`` None)."""
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    std = statistics.stdev(values) if n > 1 else 0.0
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "ci95": half,
            "lo": None if half is None else mean - half, "hi": None if half is None else mean + half}


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """``mean(a) - mean(b)`` with Welch's ``level`` interval (unequal variances, Welch-Satterthwaite degrees of
    freedom); no interval (``half`` None) unless both sides have two values or more, nor when neither side varies
    (``no_spread``: every seed gave the same value on both sides, e.g. a seed that changes nothing; an interval of
    width 0 would claim a certainty the seeds do not show)."""
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
    none = {"diff": diff, "ci95": None, "lo": None, "hi": None, "df": None, "no_spread": False}
    if len(a) < 2 or len(b) < 2:
        return none
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return none | {"no_spread": True}
    se = math.sqrt(va + vb)
    den = (va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0)
    df = (va + vb) ** 2 / den if den > 0 else float(len(a) + len(b) - 2)
    half = t_quantile((1 + level) / 2, df) * se
    return {"diff": diff, "ci95": half, "lo": diff - half, "hi": diff + half, "df": df, "no_spread": False}


# ---------------------------------------------------------------------------------------------------- sweeps -> arms
def parse_overrides(text: str) -> dict[str, str]:
    """``"model=yolo init=simclr seed=1"`` -> ``{"model": "yolo", "init": "simclr", "seed": "1"}``."""
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def expand_sweep(params: dict[str, Any] | None, overrides: Sequence[str]) -> list[list[str]]:
    """Every job's overrides of a multirun of Hydra's basic sweeper, in job-number order: the sweeper's ``params``
    (``hydra.sweeper.params``) then the command line's task ``overrides`` (a key given again keeps its first place
    and takes the later value), expanded as their product, as ``BasicSweeper.split_arguments`` does. A sweep the
    basic sweeper cannot enumerate raises ``ValueError``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in (params or {}).items()),
                                                      *overrides]):
        key = o.get_key_element()
        if not o.is_sweep_override():
            choices[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise ValueError(f"{o.input_line}: not a sweep the basic sweeper enumerates")
    return [list(job) for job in itertools.product(*choices.values())]


def multirun_grid(sweep: Path) -> list[list[str]] | None:
    """The jobs a sweep launched (:func:`expand_sweep` of its ``multirun.yaml``, which Hydra writes when the sweep
    starts). None without that file, for another sweeper (e.g. Optuna's) or a sweep it cannot enumerate."""
    cfg = _read_yaml(sweep / "multirun.yaml")
    hydra = cfg.get("hydra") if isinstance(cfg.get("hydra"), dict) else {}
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    try:
        return expand_sweep(sweeper.get("params"), (hydra.get("overrides") or {}).get("task") or [])
    except Exception:  # noqa: BLE001  (an override Hydra's parser refuses here: no expected grid)
        return None


def planned_sweep(cfg, cmd: Sequence[str]) -> dict[str, Any]:
    """What a ``detkit-train -m`` command (:func:`finetune_command`) will launch, for the report to count the jobs
    that never recorded a result even if the sweep never starts: the sweeper's parameters of the composed
    fine-tuning config ``cfg`` and the command's task overrides (the ``hydra`` ones left out, as Hydra does)."""
    from omegaconf import OmegaConf

    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    task = [o for o in cmd[2:] if not _key(o).startswith(("hydra.", "hydra/"))]
    return {"params": OmegaConf.to_container(params) if params is not None else {}, "overrides": task}


def _job_folder(row: dict[str, str], sweep: Path) -> Path | None:
    """The folder of a summary row's job that holds its ``job_status.json`` (for the same job number): first under
    ``sweep`` (``sweep/<job number>``, or ``sweep`` joined with the last components of the recorded ``output_dir``:
    a study folder moved or unpacked elsewhere), then the recorded absolute ``output_dir``. None if none does."""
    recorded = Path(row["output_dir"]) if row.get("output_dir") else None
    job = str(row.get("job") or "").strip()
    candidates = [sweep / job] if job.isdigit() else []
    if recorded is not None:
        candidates += [sweep.joinpath(*recorded.parts[-k:]) for k in range(1, min(3, len(recorded.parts)) + 1)]
        candidates.append(recorded)
    for folder in candidates:
        status = folder / STATUS_FILE
        if status.is_file() and (not job.isdigit() or str(json.loads(status.read_text()).get("job")) == job):
            return folder
    return None


def _grid_job(row: dict[str, str], grid: list[list[str]] | None) -> list[str] | None:
    """The grid's overrides for the row's job number, if they agree with the overrides the row lists."""
    job = str(row.get("job") or "").strip()
    if grid is None or not job.isdigit() or int(job) >= len(grid):
        return None
    cell = grid[int(job)]
    return cell if set(row["overrides"].split()) <= set(cell) else None


def job_overrides(row: dict[str, str], sweep: Path, grid: list[list[str]] | None, complete: bool) -> list[str]:
    """All overrides of a sweep job. ``summary.csv``'s column keeps only those that vary between the jobs
    (``complete``: a summary of one job, which lists them all), so the ones shared by every job (e.g.
    ``semi=teacher``, ``data.train_fraction=0.1``) come from the job's ``job_status.json`` (:func:`_job_folder`),
    else from the sweep's ``grid`` (its ``multirun.yaml``). Neither: a clear error, never the defaults of
    :data:`ARM_KEYS` (which would label a self-training arm as scratch)."""
    folder = _job_folder(row, sweep)
    if folder is not None:
        return list(json.loads((folder / STATUS_FILE).read_text())["overrides"])
    if complete:
        return row["overrides"].split()
    cell = _grid_job(row, grid)
    if cell is not None:
        return cell
    raise SystemExit(
        f"detkit-study: sweep {sweep}: job {row.get('job')}'s folder (recorded as {row.get('output_dir')}) is not "
        f"there, nor under the sweep folder, and {sweep / 'multirun.yaml'} does not list the job: the overrides "
        "shared by every job (init, semi, data.train_fraction, model...) are not in summary.csv, so its arms "
        "cannot be labelled. Put the job folders (or multirun.yaml) back under the sweep folder.")


def _switched_on(value: Any) -> bool:
    """A boolean override as the command line gives it (``true``, ``True``, ``1``, ``yes``, ``on``)."""
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _arm_of(overrides: Sequence[str], arm_name: str | None) -> tuple[tuple, str]:
    """A job's arm (model, init, self-training, transfer recipe, label budget) and seed from all its overrides;
    ``arm_name`` (a pretraining arm's sweep) renames a pretrained init to ``INIT:NAME``."""
    ov = {**ARM_KEYS, **parse_overrides(" ".join(overrides))}
    if arm_name and ov["init"] != "scratch":
        ov["init"] = f"{ov['init']}:{arm_name}"
    if ov["semi"] != "none" and ov.get("semi.pseudo_labels", "boxes") != "boxes":
        ov["semi"] = f"{ov['semi']}:{ov['semi.pseudo_labels']}"  # dense pseudo-labels are an arm of their own
        if _switched_on(ov.get("semi.dense_per_class")):
            ov["semi"] += ":per_class"
    if ov["semi"] != "none" and _switched_on(ov.get("semi.soft_background")):
        ov["semi"] += ":soft_background"  # Faster R-CNN's soft background weights are an arm of their own
    return (ov["model"], ov["init"], ov["semi"], ov["transfer"], float(ov["data.train_fraction"])), ov.get("seed", "")


def _arm_key(arm: dict[str, Any]) -> tuple:
    base = arm["init"].split(":", 1)[0]
    return (arm["model"], arm["transfer"], arm["semi"] != "none", arm["semi"], INIT_ORDER.get(base, 9), arm["init"],
            arm["fraction"])


def _read_rows(summary_csv: Path) -> list[dict[str, str]]:
    if not summary_csv.is_file():
        return []
    with summary_csv.open() as f:
        return list(csv.DictReader(f))


def aggregate(summary_csv: Path, arm_name: str | None = None,
              planned: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """Group a sweep's ``summary.csv`` by arm (model, init, self-training, transfer recipe, label budget) over
    seeds; ``arm_name`` (a pretraining arm's sweep) renames every pretrained init to ``INIT:NAME``.

    The jobs expected: the grid of the sweep's ``multirun.yaml`` (what it launched), else ``planned`` (what the
    study meant to launch: a sweep never started has no folder, and ``summary_csv`` need not exist). Every arm of
    that grid gets a row, with ``expected`` (its jobs) and ``missing`` (those that never recorded a result:
    stopped at the budget, never started, killed); a job whose overrides differ from the launched grid's (a job
    folder left by an earlier launch into the same folder) is left out, and said so.

    Returns one dict per arm: ``model``, ``init``, ``semi``, ``transfer``, ``fraction``, ``n`` (completed seeds),
    ``failed``, ``missing``, ``expected`` (None without a grid), ``seeds``, and for each of AP/AP50/AP75 the
    ``mean``, ``std`` (sample standard deviation; 0 for one seed), ``ci95`` (half-width of the 95% t-interval;
    None for one seed), ``lo``, ``hi`` and the per-seed ``values``."""
    sweep = summary_csv.parent
    launched = multirun_grid(sweep)
    grid = launched if launched is not None else planned
    rows = _read_rows(summary_csv)
    groups: dict[tuple, dict[str, Any]] = {}
    expected: dict[tuple, int] = defaultdict(int)
    for cell in grid or []:
        key = _arm_of(cell, arm_name)[0]
        expected[key] += 1
        groups.setdefault(key, {"values": defaultdict(list), "failed": 0, "seeds": []})
    stale = 0
    for row in rows:
        overrides = job_overrides(row, sweep, grid, complete=len(rows) == 1)
        job = str(row.get("job") or "").strip()
        if launched is not None and not (job.isdigit() and int(job) < len(launched)
                                         and set(overrides) == set(launched[int(job)])):
            stale += 1
            continue
        key, seed = _arm_of(overrides, arm_name)
        arm = groups.setdefault(key, {"values": defaultdict(list), "failed": 0, "seeds": []})
        if row["status"] != "completed" or row.get("AP") in (None, ""):
            arm["failed"] += 1
            continue
        arm["seeds"].append(seed)
        for m in METRICS:
            arm["values"][m].append(float(row[m]))
    if stale:
        print(f"[detkit-study] {sweep}: {stale} job folder(s) left out: not jobs of the launch in multirun.yaml "
              "(an earlier launch into the same folder)", flush=True)
    arms = []
    for (model, init, semi, transfer, fraction), g in groups.items():
        want = expected.get((model, init, semi, transfer, fraction)) if grid is not None else None
        arm: dict[str, Any] = {"model": model, "init": init, "semi": semi, "transfer": transfer, "fraction": fraction,
                               "n": len(g["seeds"]), "failed": g["failed"], "expected": want,
                               "missing": max(0, (want or 0) - len(g["seeds"]) - g["failed"]), "seeds": g["seeds"]}
        for m in METRICS:
            vals = g["values"][m]
            stats = t_interval(vals)
            arm[m] = {k: stats[k] for k in ("mean", "std", "ci95", "lo", "hi")} | {"values": vals}
        arms.append(arm)
    return sorted(arms, key=_arm_key)


def _baseline(arms: list[dict[str, Any]], a: dict[str, Any]) -> dict[str, Any] | None:
    """The arm ``a`` is compared with: scratch, no self-training, same detector, transfer recipe and budget."""
    return next((b for b in arms if b["model"] == a["model"] and b["init"] == "scratch" and b["semi"] == "none"
                 and b["transfer"] == a["transfer"] and b["fraction"] == a["fraction"]), None)


def gain(arms: list[dict[str, Any]], a: dict[str, Any], metric: str = "AP50") -> dict[str, Any] | None:
    """``a``'s difference of ``metric`` to its scratch baseline, with Welch's 95% interval (None for a baseline)."""
    base = _baseline(arms, a)
    if base is None or base is a or not a[metric]["values"] or not base[metric]["values"]:
        return None
    return welch_interval(a[metric]["values"], base[metric]["values"])


def _cell(stats: dict[str, Any]) -> str:
    if stats["mean"] != stats["mean"]:  # nan: no completed seed
        return "-"
    return f"{stats['mean']:.3f}" + ("" if stats["ci95"] is None else f" ± {stats['ci95']:.3f}")


def _gain_cell(g: dict[str, Any] | None) -> str:
    if g is None or g["diff"] != g["diff"]:
        return ""
    if g.get("no_spread"):
        return f"{g['diff']:+.3f} (no spread)"
    return f"{g['diff']:+.3f}" + ("" if g["ci95"] is None else f" [{g['lo']:+.3f}, {g['hi']:+.3f}]")


def _seeds_cell(a: dict[str, Any]) -> str:
    """``n`` completed seeds, ``of`` the jobs expected when the sweep's grid is known, with the failed and missing
    ones, e.g. ``3 of 5 (1 failed, 1 missing)``."""
    notes = [f"{a['failed']} failed"] if a["failed"] else []
    notes += [f"{a['missing']} missing"] if a.get("missing") else []
    return (f"{a['n']}" + (f" of {a['expected']}" if a.get("expected") is not None else "")
            + (f" ({', '.join(notes)})" if notes else ""))


TABLE_NOTE = ("AP, AP50, AP75: mean ± half-width of the 95% t-interval over the seeds, mean ± t(0.975, n-1)·s/√n "
              "(s: the sample standard deviation of the n seeds; one seed: its value alone). AP50 gain vs scratch: "
              "difference of the means to scratch without self-training (same detector, budget and transfer "
              "recipe) with Welch's 95% interval [low, high] (\"no spread\": every seed gave the same value on "
              "both sides, no interval). Seeds: the jobs that completed, of the jobs the sweep launched or the study "
              "planned (failed: the job recorded an error; missing: it never recorded a result, i.e. it was stopped "
              "at the budget, never started or killed).")


def table(arms: list[dict[str, Any]]) -> str:
    """Markdown table: one row per arm, mean ± 95% t-interval over seeds, and the AP50 gain vs scratch with Welch's
    95% interval. The self-training and transfer columns appear when an arm uses them (not ``none``)."""
    show_semi = any(a.get("semi", "none") != "none" for a in arms)
    show_transfer = any(a.get("transfer", "none") != "none" for a in arms)
    head = ["detector", "init", *(["self-training"] if show_semi else []), *(["transfer"] if show_transfer else []),
            "labels", "seeds", *METRICS, "AP50 gain vs scratch"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in arms:
        seeds = _seeds_cell(a)
        cells = [a["model"], a["init"], *([a.get("semi", "none")] if show_semi else []),
                 *([a.get("transfer", "none")] if show_transfer else []), f"{a['fraction']:.0%}", seeds,
                 *(_cell(a[m]) for m in METRICS), _gain_cell(gain(arms, a))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_checks(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scratch (no self-training) at the largest budget against each smaller one, per detector and transfer recipe:
    the AP50 difference with Welch's 95% interval. ``beats``: the interval lies above 0."""
    out = []
    scratch = [a for a in arms if a["init"] == "scratch" and a["semi"] == "none" and a["n"]]
    for model, transfer in sorted({(a["model"], a["transfer"]) for a in scratch}):
        mine = sorted((a for a in scratch if a["model"] == model and a["transfer"] == transfer),
                      key=lambda a: a["fraction"])
        top = mine[-1] if mine else None
        for small in mine[:-1]:
            w = welch_interval(top["AP50"]["values"], small["AP50"]["values"])
            out.append({"model": model, "transfer": transfer, "large": top["fraction"], "small": small["fraction"],
                        **w, "beats": w["lo"] is not None and w["lo"] > 0})
    return out


def _budget_line(c: dict[str, Any]) -> str:
    what = f"{c['model']}" + (f" (transfer={c['transfer']})" if c["transfer"] != "none" else "")
    diff = _gain_cell(c)
    if c["beats"]:
        verdict = "**passes**: the interval is above 0"
    elif c.get("no_spread"):
        verdict = "**not shown**: no spread (every seed gave the same AP50 on both sides), no interval"
    elif c["diff"] > 0:
        verdict = "**not shown**: higher on average, but the interval reaches 0" if c["ci95"] is not None else \
            "**not shown**: higher, one seed (no interval)"
    else:
        verdict = "**fails**: not higher"
    return (f"- {what}, scratch: {c['large']:.0%} vs {c['small']:.0%} of the labels, AP50 difference {diff}: "
            f"{verdict}")


# ---------------------------------------------------------------------------------------------------- pretraining
def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001  (a damaged config: the summary goes without it)
        return {}
    return data if isinstance(data, dict) else {}


def _pool_size(metrics: dict[str, Any], data: dict[str, Any]) -> int | None:
    """The number of images a pretraining used: its ``pretrain_metrics.json`` (``input_check.images``), else the
    images of its ``data.ann_file`` if that file is still there."""
    check = metrics.get("input_check")
    if isinstance(check, dict) and isinstance(check.get("images"), int):
        return check["images"]
    ann = data.get("ann_file")
    if isinstance(ann, str) and Path(ann).is_file():
        try:
            return len(json.loads(Path(ann).read_text())["images"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def pretrain_summary(folder: Path, margin: float = 1.0) -> dict[str, Any] | None:
    """A pretraining run's loss against chance: the loss per logged step (``logs/metrics.csv``), the final loss
    (the mean of the last tenth of the logged steps, at least one), the chance level ``ln(2B - 1)`` for the
    effective global batch B (NT-Xent with B images: 1 positive among 2B - 1 candidates; DenseCL's dense term has
    the same count, so its total loss has the same chance level), and ``below``: final <= chance - ``margin``.
    B is the configured batch times the devices, or the pool's size when the pool is smaller (the loader then
    makes one batch of the whole pool). None if the run left no log and no metrics."""
    log_csv, metrics_json = folder / "logs" / "metrics.csv", folder / "pretrain_metrics.json"
    if not log_csv.is_file() and not metrics_json.is_file():
        return None
    cfg = _read_yaml(folder / ".hydra" / "config.yaml")
    data, trainer, model = cfg.get("data") or {}, cfg.get("trainer") or {}, cfg.get("model") or {}
    method = "densecl" if "DenseCL" in str(model.get("_target_", "")) else "simclr"
    batch = data.get("batch_size") if isinstance(data.get("batch_size"), int) else None
    devices = trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1
    curve = []
    if log_csv.is_file():
        with log_csv.open() as f:
            for row in csv.DictReader(f):
                if row.get("pretrain/loss"):
                    curve.append((int(float(row.get("step") or len(curve))), float(row["pretrain/loss"])))
    metrics = json.loads(metrics_json.read_text()) if metrics_json.is_file() else {}
    tail = [loss for _, loss in curve[-max(1, len(curve) // 10):]]
    final = statistics.fmean(tail) if tail else metrics.get("pretrain/loss")
    images = _pool_size(metrics, data)
    effective = None if not batch else batch * devices if not images else min(batch * devices, images)
    chance = math.log(2 * effective - 1) if effective else None
    out = {"method": method, "batch_size": batch, "devices": devices, "effective_batch": effective,
           "logged_steps": len(curve), "epochs": metrics.get("epochs"), "wall_time_s": metrics.get("wall_time_s"),
           "images": images, "final_loss": final, "final_over_steps": len(tail), "chance": chance,
           "margin": None if final is None or chance is None else chance - final, "required_margin": margin,
           "curve": curve}
    out["below"] = out["margin"] is not None and out["margin"] >= margin
    return out


def pretrain_runs(out: Path) -> dict[str, Path]:
    """The pretraining runs of a study folder, by label: ``OUT/pretrain/{simclr,densecl}`` (and the single
    ``OUT/pretrain`` of studies made before DenseCL joined), ``OUT/arms/NAME/pretrain`` as ``METHOD:NAME``."""
    runs: dict[str, Path] = {}
    root = out / "pretrain"
    if (root / "pretrain_metrics.json").is_file() or (root / "logs" / "metrics.csv").is_file():
        runs["simclr"] = root
    for method in SSL_METHODS:
        if (root / method).is_dir():
            runs[method] = root / method
    for arm_dir in sorted(p for p in (out / "arms").glob("*") if p.is_dir()):
        if (arm_dir / "pretrain").is_dir():
            spec = arm_dir / "arm.json"
            method = json.loads(spec.read_text()).get("method", "simclr") if spec.is_file() else "simclr"
            runs[f"{method}:{arm_dir.name}"] = arm_dir / "pretrain"
    return runs


def _loss_line(label: str, s: dict[str, Any]) -> str:
    if s["final_loss"] is None:
        return f"| {label} | | | | | no loss logged |"
    chance = "" if s["chance"] is None else f"{s['chance']:.2f}"
    if s["margin"] is None:
        verdict = "chance unknown (batch size not found)"
    elif s["below"]:
        verdict = f"**well below chance** ({s['margin']:.2f} nats below: the positive {math.exp(s['margin']):.1f}x " \
                  "as likely as at chance)"
    elif s["margin"] > 0:
        verdict = f"**not well below chance**: {s['margin']:.2f} nats below (needs {s['required_margin']:.2f})"
    else:
        verdict = f"**not below chance**: {-s['margin']:.2f} nats above"
    batch = f"{s['batch_size'] or ''}"
    if s.get("effective_batch") and s["batch_size"] and s["effective_batch"] < s["batch_size"] * s["devices"]:
        batch += f" ({s['effective_batch']}: the pool)"
    return f"| {label} | {batch} | {s['logged_steps']} | {s['final_loss']:.3f} | {chance} | {verdict} |"


# ---------------------------------------------------------------------------------------------------- plots
def _arm_label(a: dict[str, Any]) -> str:
    parts = [a["model"], a["init"]]
    if a.get("semi", "none") != "none":
        parts.append(f"+{a['semi']}")
    if a.get("transfer", "none") != "none":
        parts.append(f"transfer={a['transfer']}")
    return ", ".join(parts)


def plot(arms: list[dict[str, Any]], path: Path) -> Path:
    """AP50 (mean ± 95% t-interval over seeds) vs label budget, one line per detector, init, self-training and
    transfer recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for label in sorted({_arm_label(a) for a in arms}):
        pts = sorted((a["fraction"], a["AP50"]["mean"], a["AP50"]["ci95"] or 0.0) for a in arms
                     if _arm_label(a) == label and a["n"])
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        model = label.split(",")[0]
        ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o" if model == "faster_rcnn" else "s",
                    linestyle="--" if ", scratch" in label and "+" not in label else "-", capsize=3, label=label)
    ax.set_xlabel("labeled training images (%)")
    ax.set_ylabel("val AP50 (mean, 95% t-interval over seeds)")
    ax.set_title("Unlabeled images: self-supervised init and self-training vs scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pretrain(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Each pretraining's loss per logged step, with its chance level ln(2B - 1) (dashed) and the required margin
    below it (dotted)."""
    runs = {k: v for k, v in runs.items() if v["curve"]}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.6))
    for label, s in runs.items():
        steps, losses = zip(*s["curve"])
        (line,) = ax.plot(steps, losses, lw=1, label=f"{label} (batch {s.get('effective_batch') or s['batch_size']})")
        if s["chance"] is not None:
            ax.axhline(s["chance"], color=line.get_color(), ls="--", lw=1)
            ax.axhline(s["chance"] - s["required_margin"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("pretraining loss")
    ax.set_title("Pretraining loss (dashed: chance ln(2B-1); dotted: the check)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- report
def sweep_dirs(out: Path, planned: Sequence[str] = ()) -> list[tuple[Path, str | None]]:
    """The fine-tuning sweeps of a study folder: ``OUT/finetune*`` and ``OUT/arms/NAME/finetune`` (with the arm's
    name), then those the study ``planned`` (folders relative to ``out``) that were never started."""
    dirs: list[tuple[Path, str | None]] = [(p, None) for p in sorted(out.glob("finetune*")) if p.is_dir()]
    dirs += [(p / "finetune", p.name) for p in sorted((out / "arms").glob("*")) if (p / "finetune").is_dir()]
    for rel in planned:
        parts = Path(rel).parts
        if out / rel not in {p for p, _ in dirs}:
            dirs.append((out / rel, parts[1] if len(parts) == 3 and parts[0] == "arms" else None))
    return dirs


def _planned_grid(spec: dict[str, Any] | None) -> list[list[str]] | None:
    """The jobs of a sweep as the study planned it (:func:`planned_sweep`); None if not recorded."""
    if not spec:
        return None
    try:
        return expand_sweep(spec.get("params"), spec.get("overrides") or [])
    except ValueError:
        return None


def _summary(sweep: Path) -> Path | None:
    """``sweep/summary.csv``, rewritten from the jobs' own ``job_status.json`` whenever the sweep folder holds any:
    a sweep stopped before its end has no summary yet, and a study rerun into its folder and stopped again left
    the earlier launch's, so a summary is never read in place of the jobs. Read as found only for a sweep copied
    without its job folders."""
    from detkit.cli.sweep import collect_rows, write_tables

    summary = sweep / "summary.csv"
    if sweep.is_dir():
        rows = collect_rows(sweep)
        if rows:
            write_tables(rows, sweep)
    return summary if summary.is_file() else None


def sweep_complete(sweep: Path, spec: dict[str, Any], encoder: Path | None = None) -> bool:
    """Whether ``sweep`` already holds every job the study plans for it (``spec``: :func:`planned_sweep`), each
    completed: the grid its ``multirun.yaml`` launched is the planned one (the same jobs, whatever their order), no
    job of it failed or is missing, and every job finished after ``encoder`` was written (an encoder pretrained
    again at the same path makes its fine-tunings stale). A study rerun into its folder then reuses the sweep
    instead of training it again (e.g. ``--semi-inits`` added to a finished study); otherwise it runs again.
    Compared are the jobs' overrides, not the contents of the experiment file: after editing it, use a new
    ``--out``."""
    planned, launched = _planned_grid(spec), multirun_grid(sweep)
    if planned is None or launched is None or sorted(map(sorted, planned)) != sorted(map(sorted, launched)):
        return False
    summary = _summary(sweep)
    if summary is None:
        return False
    arms = aggregate(summary, planned=planned)
    if not arms or not all(a["failed"] == 0 and a["missing"] == 0 and a["n"] == a["expected"] for a in arms):
        return False
    if encoder is not None and encoder.is_file():
        written = encoder.stat().st_mtime
        finished = [p.stat().st_mtime for p in sweep.glob(f"*/{STATUS_FILE}")]
        if len(finished) < len(planned) or min(finished) < written:
            return False
    return True


#: What ``--report-only`` keeps of the earlier run's ``study.json``: the run's own record, which no file of the
#: study folder holds (its command, stages, unlabeled sets and the sweeps it planned).
RUN_RECORD = ("command", "wall_time_s", "preset", "stages", "unlabeled", "unlabeled_sets", "planned_sweeps")


def run_record(out: Path) -> dict[str, Any]:
    """The earlier run's :data:`RUN_RECORD` from ``out/study.json``, for ``--report-only``; {} without one."""
    try:
        data = json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in RUN_RECORD if k in data} if isinstance(data, dict) else {}


def report(out: Path, extra: dict[str, Any] | None = None, loss_margin: float = 1.0) -> Path:
    """Write ``study.md``, ``study.json``, ``study_ap50.png`` and ``study_pretrain_loss.png`` from the sweeps'
    ``summary.csv`` files (rebuilt from the job folders), the pretraining logs of the study folder ``out`` and
    ``extra`` (the run's record: command, stages, unlabeled sets, ``planned_sweeps``: the jobs each sweep was to
    launch, so a sweep never started still gets its arms' rows)."""
    info = dict(extra or {})
    planned = info.get("planned_sweeps") or {}
    arms: list[dict[str, Any]] = []
    sweeps = []
    for sweep, arm_name in sweep_dirs(out, list(planned)):
        summary = _summary(sweep)
        if summary is not None:
            sweeps.append(str(summary))
        grid = _planned_grid(planned.get(sweep.relative_to(out).as_posix()))
        found = aggregate(sweep / "summary.csv", arm_name, grid)
        arms += found
        if arm_name and found:
            spec = sweep.parent / "arm.json"
            arm_info = json.loads(spec.read_text()) if spec.is_file() else {}
            arm_pre = sweep.parent / "pretrain" / "pretrain_metrics.json"
            if arm_pre.is_file():
                arm_info["pretrain"] = json.loads(arm_pre.read_text())
            info.setdefault("pretraining_arms", {})[arm_name] = arm_info
    arms.sort(key=_arm_key)
    for a in arms:
        a["AP50_gain_vs_scratch"] = gain(arms, a)
    pretraining = {label: s for label, folder in pretrain_runs(out).items()
                   if (s := pretrain_summary(folder, loss_margin)) is not None}
    if not arms and not pretraining:
        raise FileNotFoundError(f"no fine-tuning or pretraining results under {out} (finetune*/summary.csv, job "
                                "folders, pretrain/): run the study first")
    if "simclr" in pretraining and (out / "pretrain" / "pretrain_metrics.json").is_file():
        info["pretrain"] = json.loads((out / "pretrain" / "pretrain_metrics.json").read_text())
    checks = {"pretraining_loss_below_chance": {k: s["below"] for k, s in pretraining.items()},
              "label_budget": budget_checks(arms)}
    (out / "study.json").write_text(json.dumps({"arms": arms, "sweeps": sweeps, "pretraining": pretraining,
                                                "checks": checks, "interval": TABLE_NOTE, **info}, indent=2))
    png = plot(arms, out / "study_ap50.png") if arms else None
    loss_png = plot_pretrain(pretraining, out / "study_pretrain_loss.png")
    lines = [f"# Do unlabeled images help? Study in {out}", ""]
    if info.get("command"):
        lines += [f"`{info['command']}`" + (f" ({info['wall_time_s']:.0f} s)" if info.get("wall_time_s") else ""),
                  ""]
    if info.get("unlabeled"):
        lines += [f"Unlabeled images: {info['unlabeled']}", ""]
    lines += ["## Checks", "", f"Pretraining loss: the mean of the last tenth of the logged steps against chance, "
              f"ln(2B - 1) for batch B (the pool's size if smaller); the check asks for {loss_margin:g} nats or more "
              "below chance.", "",
              "| pretraining | batch | logged steps | final loss | chance | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [_loss_line(label, s) for label, s in pretraining.items()] or ["| (none found) | | | | | |"]
    lines += ["", "Label budget (the schedule is long enough for labels to matter):", ""]
    lines += [_budget_line(c) for c in checks["label_budget"]] or ["- no scratch arm at two budgets"]
    images = [f"![pretraining loss]({loss_png.name})"] if loss_png else []
    images += [f"![AP50 vs label budget]({png.name})"] if png else []
    lines += ["", "## Result", "", TABLE_NOTE, "", table(arms).rstrip() if arms else "(no fine-tuning job completed)",
              "", " ".join(images)]
    stages = [s for s in info.get("stages", []) if s.get("status") != "ok"]
    if stages:
        lines += ["", "## Incomplete", ""] + [f"- {s['stage']}: {s['status']}" for s in stages]
    md = out / "study.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# ---------------------------------------------------------------------------------------------------- unlabeled sets
def _compose_finetune(experiment: str, overrides: list[str]):
    """The fine-tuning config every job of the study shares (sweeps and launcher settings left out), with the
    Hydra node (its sweeper's parameters)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from detkit.paths import config_dir

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and not o.input_line.startswith("hydra")]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *(["data=coco"] if _own_data(overrides) else []),
                                           *fixed], return_hydra_config=True)


def sweep_values(cfg, overrides: list[str], key: str) -> list[str]:
    """The values ``key`` takes in the sweep: the command line's (a sweep or one value), else the experiment's
    sweeper parameter, else the composed value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for o in reversed(OverridesParser.create().parse_overrides(overrides)):
        if o.get_key_element() == key:
            return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    if key in params and params[key] is not None:
        return [v.strip() for v in str(params[key]).split(",")]
    return [str(OmegaConf.select(cfg, key))]


def _images(ann: str | None, root: str | None) -> list[tuple[Path, dict]]:
    from detkit.data.validate import load_coco_json

    if not ann or not root:
        return []
    return [(Path(root).resolve() / img["file_name"], img) for img in load_coco_json(Path(ann))["images"]
            if isinstance(img, dict) and isinstance(img.get("file_name"), str)]


def _val_paths(data) -> set[Path]:
    """The image files of the val split, the one the detectors are scored on (resolved as :func:`_images` does)."""
    return {p for p, _ in _images(data.get("val_ann"), data.get("val_images"))}


def write_pretrain_pool(data, folder: Path, pool: str = "train+test") -> tuple[Path, Path, dict[str, Any]]:
    """Write ``folder/pretrain_pool.json`` (``pretrain_pool_train.json``, ``pretrain_pool_all.json`` for the other
    pools): the images SSL pretraining sees, labels dropped. ``train+test``: the
    train and test splits' images; ``train``: train only; ``all``: also val. Except with ``all``, every image of the
    val split (the one the detectors are scored on) is left out, even one listed in train or test. Returns the json,
    its image root and a description."""
    splits = ["train"] + (["test"] if pool in ("train+test", "all") else []) + (["val"] if pool == "all" else [])
    val = _val_paths(data) if pool != "all" else set()
    seen, picked, counts = set(), [], {}
    for split in splits:
        images = _images(data.get(f"{split}_ann"), data.get(f"{split}_images"))
        counts[split] = len(images)
        for path, img in images:
            if path in val or path in seen:
                continue
            seen.add(path)
            picked.append((path, img))
    if not picked:
        raise SystemExit(f"detkit-study: the pretraining pool ({pool}) is empty once the val images are left out "
                         "(are train and val the same images?); --pretrain-pool all pretrains on val too")
    root = Path(os.path.commonpath([str(p.parent) for p, _ in picked]))
    images = [{"id": i + 1, "file_name": str(p.relative_to(root)), "width": img.get("width"),
               "height": img.get("height")} for i, (p, img) in enumerate(picked)]
    folder.mkdir(parents=True, exist_ok=True)
    # named by its pool, so that an encoder pretrained on another pool (e.g. with the val images) is never reused
    path = folder / ("pretrain_pool.json" if pool == "train+test" else f"pretrain_pool_{pool}.json")
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    left_out = sum(counts.values()) - len(picked)
    text = (f"pretraining pool {len(picked)} images ({' + '.join(f'{s} {n}' for s, n in counts.items())}, labels "
            f"unused; {left_out} left out as val images or duplicates)" +
            ("; **includes the val images: transductive**" if pool == "all" else "; no val image"))
    return path, root, {"pool": pool, "images": len(picked), "splits": counts, "left_out": left_out, "text": text}


def write_complement(data, fraction: float, folder: Path) -> tuple[Path, dict[str, Any]]:
    """Write the train images outside the labeled subset of ``fraction`` (drawn by
    :class:`detkit.data.coco.CocoDetection` exactly as the data module draws it: same validation, ``subset_seed``)
    as a COCO json, their labels kept only to measure self-training's pseudo-labels. As for the pretraining pool,
    an image of the val split listed in train too is left out (self-training on the images of the score would be
    transductive); ``val_left_out`` counts them. Returns the path and counts."""
    from detkit.data.coco import CocoDetection

    kw = {"transform": None, "skip_invalid": bool(data.get("skip_invalid", False)),
          "check_images": bool(data.get("check_images", True))}
    seed = int(data.get("subset_seed", 0))
    full = CocoDetection(data["train_ann"], data["train_images"], **kw)
    labeled = CocoDetection(data["train_ann"], data["train_images"], subset_fraction=fraction, subset_seed=seed, **kw)
    keep = {img["id"] for img in labeled.coco_data["images"]}
    coco = full.coco_data
    val, path_of = _val_paths(data), {img["id"]: p for p, img in _images(data["train_ann"], data["train_images"])}
    outside = [img for img in coco["images"] if img["id"] not in keep]
    images = [img for img in outside if path_of.get(img["id"]) not in val]
    ids = {img["id"] for img in images}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train_complement_f{round(100 * fraction)}_s{seed}.json"
    path.write_text(json.dumps({"images": images, "annotations": [a for a in coco["annotations"]
                                                                   if a["image_id"] in ids],
                                "categories": coco["categories"]}))
    return path, {"fraction": fraction, "subset_seed": seed, "labeled": len(keep), "unlabeled": len(images),
                  "val_left_out": len(outside) - len(images)}


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class Sweep:
    """One fine-tuning sweep of the study: its folder name, the encoder file it reads, its own overrides."""

    name: str
    encoder: Path | None
    overrides: list[str]


def plan_sweeps(ssl: list[str], semi_inits: list[str], small: list[float], encoders: dict[str, Path],
                complements: dict[float, Path], train_images: str | None, imagenet: bool = False) -> list[Sweep]:
    """The fine-tuning sweeps: ``finetune`` (scratch and SimCLR; ImageNet with ``imagenet``), ``finetune_densecl``,
    and per budget below 100% ``finetune_semi_fPCT`` (self-training from scratch and/or SimCLR) and
    ``finetune_semi_fPCT_densecl``."""
    main = ["scratch", *(["simclr"] if "simclr" in ssl else []), *(["imagenet"] if imagenet else [])]
    sweeps = [Sweep("finetune", encoders.get("simclr"), [f"init={','.join(main)}"])]
    if "densecl" in ssl:
        sweeps.append(Sweep("finetune_densecl", encoders["densecl"], ["init=densecl"]))
    for f in small:
        semi = ["semi=teacher", f"semi.unlabeled_images={train_images}", f"semi.unlabeled_ann={complements[f]}",
                f"data.train_fraction={f}"]
        first = [i for i in semi_inits if i in ("scratch", "simclr")]
        if first:
            sweeps.append(Sweep(f"finetune_semi_f{round(100 * f)}", encoders.get("simclr") if "simclr" in first
                                else None, [*semi, f"init={','.join(first)}"]))
        if "densecl" in semi_inits:
            sweeps.append(Sweep(f"finetune_semi_f{round(100 * f)}_densecl", encoders["densecl"],
                                [*semi, "init=densecl"]))
    return sweeps


class Runner:
    """Runs the study's commands, each in its own process group; with a deadline, a command still running then is
    stopped (the whole group: the launcher's workers and their loader workers too) and the study goes on to its
    report. Records every stage's status."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline, self.stages = deadline, []

    def __call__(self, stage: str, cmd: list[str]) -> str:
        left = None if self.deadline is None else self.deadline - time.time()
        if left is not None and left < MIN_STAGE_S:
            status = f"not run ({max(left, 0):.0f} s left of the budget)"
            print(f"[detkit-study] {stage}: {status}", flush=True)
            self.stages.append({"stage": stage, "status": status, "seconds": 0.0})
            return status
        print("[detkit-study]", " ".join(cmd), flush=True)
        t0 = time.time()
        p = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = p.wait(timeout=left)
            status = "ok" if rc == 0 else f"failed (exit status {rc})"
        except subprocess.TimeoutExpired:
            status = f"stopped at the budget after {time.time() - t0:.0f} s"
            self._stop(p)
        except BaseException:  # Ctrl-C, or the study itself stopped: never leave the group running
            self._stop(p)
            raise
        self._kill(p.pid, signal.SIGKILL)  # what the stage left behind (loader workers, launcher workers)
        self.stages.append({"stage": stage, "status": status, "seconds": round(time.time() - t0, 1)})
        if status != "ok":
            print(f"[detkit-study] {stage}: {status}", flush=True)
        return status

    def note(self, stage: str, status: str, detail: str | None = None) -> None:
        print(f"[detkit-study] {stage}: {detail or status}", flush=True)
        self.stages.append({"stage": stage, "status": status, "seconds": 0.0,
                            **({"detail": detail} if detail else {})})

    def _stop(self, p: subprocess.Popen) -> None:
        self._kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill(p.pid, signal.SIGKILL)
            p.wait()

    @staticmethod
    def _kill(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pretrain_command(args: argparse.Namespace, pool: Path, root: Path, extra: list[str]) -> list[str]:
    """The ``detkit-pretrain`` settings every pretraining of the study shares (the pool, views, batch, epochs,
    the loss logged every step), then ``extra``."""
    base = [f"trainer.max_epochs={args.pretrain_epochs * args.scale}", f"data.image_size={args.pretrain_size}",
            f"data.batch_size={args.pretrain_batch}", f"data.crop_scale=[{args.pretrain_crop_scale}]",
            f"data.images={root}", f"data.ann_file={pool}",
            "trainer.log_every_n_steps=1", *args.preset_pretrain_overrides]
    return merge_overrides(base, [*args.pretrain_override, *extra])


def check_reused_encoder(encoder: Path, planned: Sequence[str]) -> None:
    """Refuse to reuse an encoder that was pretrained with other settings than the ones this study would use (e.g.
    an ``--out`` of an earlier study with other crops or epochs): the ``.hydra/overrides.yaml`` beside it must hold
    the ``planned`` overrides (``hydra.*`` aside). An encoder without that record (placed by hand) is reused as is."""
    import yaml

    record = encoder.parent / ".hydra" / "overrides.yaml"
    if not record.is_file():
        print(f"[detkit-study] reusing {encoder} (no record of its pretraining settings beside it)", flush=True)
        return
    saved = {str(o) for o in (yaml.safe_load(record.read_text()) or []) if not _key(str(o)).startswith("hydra")}
    want = {o for o in planned if not _key(o).startswith("hydra")}
    if saved != want:
        raise SystemExit(f"detkit-study: {encoder} was pretrained with other settings than this study's: it had "
                         f"[{', '.join(sorted(saved - want)) or 'their defaults'}], the study sets "
                         f"[{', '.join(sorted(want - saved)) or 'their defaults'}]; pass another --out, or delete "
                         f"{encoder.parent} (and the sweeps fine-tuned from it) to pretrain it again")
    print(f"[detkit-study] reusing {encoder}", flush=True)


def _crop_scale(text: str) -> str:
    """``"LO,HI"`` -> the same, checked: two numbers with ``0 < LO <= HI <= 1``."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"detkit-study: --pretrain-crop-scale {text!r}: give LO,HI, e.g. 0.4,1.0") from None
    if not 0 < lo <= hi <= 1:
        raise SystemExit(f"detkit-study: --pretrain-crop-scale {text!r}: needs 0 < LO <= HI <= 1 (fractions of the "
                         "image area)")
    return f"{lo},{hi}"


def _split(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    values = [] if text.strip() in ("", "none") else [v.strip() for v in text.split(",")]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"detkit-study: {flag} {text!r}: unknown {bad}; choose from {', '.join(allowed)} (or none)")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="detkit-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="full (default: the whole study), cpu (75 min on 2 cores, the checks) or gpu (one call <= 8 min)")
    p.add_argument("--out", default="runs/study", help="study folder (unlabeled/, pretrain/, finetune*/, study.md)")
    p.add_argument("--experiment", default=None, help="the fine-tuning experiment (preset's: study_bccd[_cpu|_gpu])")
    p.add_argument("--ssl", default=None, help="pretraining methods, comma-separated: simclr,densecl (or none)")
    p.add_argument("--semi-inits", default=None,
                   help="self-training arms at the budgets below 100%%: inits among scratch,simclr,densecl (or none)")
    p.add_argument("--scale", type=int, default=1, help="multiplies pretraining epochs and fine-tuning steps")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs at scale 1")
    p.add_argument("--pretrain-size", type=int, default=None, help="view size (px)")
    p.add_argument("--pretrain-batch", type=int, default=None)
    p.add_argument("--pretrain-crop-scale", default=None, metavar="LO,HI",
                   help="area range of the random resized crops (every preset: 0.4,1.0; SimCLR's ImageNet recipe: "
                        "0.08,1.0, under which two crops of one BCCD field rarely share a cell and the loss stays "
                        "near chance)")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra detkit-pretrain override for every pretraining (repeatable), e.g. model.temperature=0.5")
    p.add_argument("--pretrain-pool", choices=["train+test", "train", "all"], default="train+test",
                   help="images SSL pretraining sees (labels unused); val only with 'all' (transductive)")
    p.add_argument("--arm", action="append", default=[], metavar='"NAME KEY=VALUE ..."',
                   help="a pretraining arm (repeatable): its own encoder from these detkit-pretrain overrides, "
                        "fine-tuned with init=simclr (init=densecl with pretrain_job=densecl); reported as INIT:NAME")
    p.add_argument("--imagenet", action="store_true",
                   help="add the init=imagenet arm (ImageNet weights; downloads them once, see above)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="end everything within this many seconds, the report from what completed (gpu preset: 450)")
    p.add_argument("--loss-margin", type=float, default=1.0,
                   help="nats below chance the pretraining loss must end for the check (default 1)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the study folder")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every fine-tuning job (after --)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("experiment", "ssl", "semi_inits", "pretrain_epochs", "pretrain_size", "pretrain_batch",
                 "pretrain_crop_scale", "budget_s"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.preset_pretrain_overrides = preset["pretrain_overrides"]
    args.pretrain_crop_scale = _crop_scale(args.pretrain_crop_scale)
    ssl = _split(args.ssl, SSL_METHODS, "--ssl")
    semi_inits = _split(args.semi_inits, ("scratch", *SSL_METHODS), "--semi-inits")
    if missing := [i for i in semi_inits if i in SSL_METHODS and i not in ssl]:
        raise SystemExit(f"detkit-study: --semi-inits {args.semi_inits}: {missing} needs its encoder: add it to --ssl")
    out = Path(args.out).resolve()
    arms = [parse_arm(a) for a in args.arm]
    if len({name for name, _ in arms}) != len(arms):
        raise SystemExit(f"detkit-study: two --arm share a name: {[name for name, _ in arms]}")
    start = time.time()
    run = Runner(None if args.budget_s is None else start + args.budget_s - REPORT_RESERVE_S)
    extra: dict[str, Any] = run_record(out) if args.report_only else {}
    if not args.report_only:
        cfg = _compose_finetune(args.experiment, args.overrides)
        if any(v not in ("0", "0.0", "None", "null") for v in sweep_values(cfg, args.overrides,
                                                                            "data.holdout_fraction")):
            raise SystemExit("detkit-study: data.holdout_fraction is for choosing settings with `detkit-train -m` "
                             "(README.md, Sweeps); the study scores val and draws its unlabeled pools from the whole "
                             "training file, so a holdout would leak into them")
        data = cfg.data
        fractions = sorted({float(f) for f in sweep_values(cfg, args.overrides, "data.train_fraction")})
        small = [f for f in fractions if f < 1.0] if semi_inits else []
        unlabeled = out / "unlabeled"
        pool, root, pool_info = write_pretrain_pool(data, unlabeled, args.pretrain_pool)
        complements, semi_info = {}, []
        for f in small:
            complements[f], c = write_complement(data, f, unlabeled)
            semi_info.append(c)
        extra["unlabeled"] = pool_info["text"] + "".join(
            f"; self-training at {c['fraction']:.0%}: the {c['unlabeled']} train images outside the {c['labeled']} "
            f"labeled ones (subset seed {c['subset_seed']}; {c['val_left_out']} val images listed in train left out)"
            for c in semi_info)
        extra["unlabeled_sets"] = {"pretrain": pool_info, "self_training": semi_info}
        print(f"[detkit-study] {extra['unlabeled']}", flush=True)

        encoders = {m: out / "pretrain" / m / "encoder.pt" for m in ssl}
        todo = [m for m in ssl if not encoders[m].is_file()]
        for m in ssl:
            if m not in todo:
                check_reused_encoder(encoders[m], [f"pretrain_job={m}", *pretrain_command(args, pool, root, [])])
        if todo:
            run("pretrain " + ",".join(todo), [
                _bin("detkit-pretrain"), "-m", f"pretrain_job={','.join(todo)}", f"hydra.sweep.dir={out / 'pretrain'}",
                "hydra.sweep.subdir=${hydra:runtime.choices.pretrain_job}", *preset["pretrain_launcher"],
                *pretrain_command(args, pool, root, [])])
            for m in todo:
                if not encoders[m].is_file():
                    run.note(f"pretrain {m}", f"no encoder written ({encoders[m]}): its arms fail")
        planned: dict[str, dict[str, Any]] = {}
        extra["planned_sweeps"] = planned
        for sweep in plan_sweeps(ssl, semi_inits, small, encoders, complements, data.get("train_images"),
                                 args.imagenet):
            cmd = finetune_command(out / sweep.name, sweep.encoder, args.scale,
                                   merge_overrides(args.overrides, sweep.overrides), experiment=args.experiment,
                                   launcher=preset["sweep_launcher"])
            planned[sweep.name] = planned_sweep(cfg, cmd)
            if sweep_complete(out / sweep.name, planned[sweep.name], sweep.encoder):
                run.note(sweep.name, "ok", f"reused: every job of {out / sweep.name} completed")
            else:
                run(sweep.name, cmd)
        for name, arm_overrides in arms:
            folder = out / "arms" / name
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            method = arm_method(arm_overrides)
            arm_extra = merge_overrides(args.pretrain_override, arm_overrides)
            encoder = folder / "pretrain" / "encoder.pt"
            if encoder.is_file():
                check_reused_encoder(encoder, pretrain_command(args, pool, root, arm_overrides))
            else:
                run(f"arm {name}: pretrain", [_bin("detkit-pretrain"), f"hydra.run.dir={folder / 'pretrain'}",
                                              *pretrain_command(args, pool, root, arm_overrides)])
            cmd = finetune_command(folder / "finetune", encoder, args.scale,
                                   merge_overrides(args.overrides, [f"init={method}"]), experiment=args.experiment,
                                   launcher=preset["sweep_launcher"])
            planned[f"arms/{name}/finetune"] = planned_sweep(cfg, cmd)
            if sweep_complete(folder / "finetune", planned[f"arms/{name}/finetune"], encoder):
                run.note(f"arm {name}: finetune", "ok", f"reused: every job of {folder / 'finetune'} completed")
            else:
                run(f"arm {name}: finetune", cmd)
            (folder / "arm.json").write_text(json.dumps({"method": method, "pretrain_overrides": arm_extra,
                                                         "wall_time_s": round(time.time() - t0, 1)}, indent=2))
        extra.update(wall_time_s=round(time.time() - start, 1), preset=args.preset, stages=run.stages,
                     command=" ".join(["detkit-study", *(sys.argv[1:] if argv is None else argv)]))
    md = report(out, extra, args.loss_margin)
    print(md.read_text())
    print(f"[detkit-study] report: {md}\n[detkit-study] plots: {out / 'study_ap50.png'}, "
          f"{out / 'study_pretrain_loss.png'}\n[detkit-study] per-job metrics: {out}/finetune*/<job>/metrics.json")
    return 0 if all(s["status"] == "ok" for s in run.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
