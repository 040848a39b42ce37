"""Helpers shared by the tests (fixtures are in conftest.py): paths, the console scripts run in-process or as
subprocesses, tiny configs, and test-only Lightning callbacks (importable by Hydra by name, also from a subprocess
run in the repository root: ``+callbacks.kill._target_=tests.helpers.KillAtStep``)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"
RACCOON = ROOT / "tests" / "data" / "raccoon"
SHARED = ROOT.parent / "shared" / "datasets"
BIN = Path(sys.executable).parent
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets (developer checkouts and CI)")

#: Tiny runs (conf/debug/): any detector, and Faster R-CNN with its heads cut down too.
TINY = ["debug=tiny"]
TINY_FRCNN = ["debug=tiny_frcnn"]


def load(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def dump(data: Any, path: Path) -> Path:
    path.write_text(json.dumps(data))
    return path


def data_args(ann: Path, root: Path) -> list[str]:
    """A COCO set as the train and val data of a detkit-train run (no test split)."""
    return [f"data.train_ann={ann}", f"data.train_images={root}", f"data.val_ann={ann}", f"data.val_images={root}",
            "data.test_ann=null"]


def env_with_path(*paths: str | Path, base: dict | None = None) -> dict:
    """The environment for a subprocess with ``paths`` put in front of ``PYTHONPATH`` (the caller's entries are kept:
    where detkit's dependencies are installed on ``PYTHONPATH``, a subprocess must still find them)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """A console script (``detkit-train``, ...) in a subprocess, as a user runs it. A fresh process imports torch and
    Lightning again (seconds): the suite keeps one such smoke test per command (tests/cli/test_commands.py) and
    runs the rest in-process with :func:`cli`."""
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=600, **kw)


@dataclass
class Result:
    """What an in-process command left: its exit status (0, or ``SystemExit``'s code), its return value, and
    everything it printed or logged (stdout, stderr, and the log records of a command that does not set up
    logging itself)."""

    returncode: int
    value: Any
    output: str


#: The console scripts' entry points (pyproject.toml [project.scripts]), imported when first called.
ENTRY_POINTS = {
    "detkit-train": "detkit.cli.train:main", "detkit-pretrain": "detkit.cli.pretrain:main",
    "detkit-eval": "detkit.cli.evaluate:main", "detkit-predict": "detkit.cli.predict:main",
    "detkit-export": "detkit.cli.export:main", "detkit-report": "detkit.cli.report:main",
    "detkit-probe": "detkit.cli.probe:main", "detkit-data-check": "detkit.cli.data_check:main",
    "detkit-convert": "detkit.cli.convert:main", "detkit-study": "detkit.cli.study:main",
}


def entry_point(command: str) -> Callable:
    module, name = ENTRY_POINTS[command].split(":")
    return getattr(__import__(module, fromlist=[name]), name)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def cli(command: str, *args: str) -> Result:
    """Run a console script's entry point in this process, with ``args`` as its command line (``sys.argv``), as the
    installed script would: Hydra commands compose, configure logging and write their run directory (give
    ``hydra.run.dir``); argparse commands get ``argv``. A ``SystemExit`` becomes the exit status; any other
    exception propagates (a traceback is a failure of the test)."""
    main = entry_point(command)
    out, err, collect = io.StringIO(), io.StringIO(), _Collect()
    argv = sys.argv
    sys.argv = [command, *args]
    # Hydra commands configure logging to the console (this stdout) themselves; the others' records are collected
    loggers = [] if command in HYDRA_COMMANDS else [logging.getLogger()]
    for lg in loggers:
        lg.addHandler(collect)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                value = main() if command in HYDRA_COMMANDS else main(list(args))
                code = 0 if command in HYDRA_COMMANDS or value is None else int(value)
            except SystemExit as e:
                value, code = None, e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for lg in loggers:
            lg.removeHandler(collect)
    return Result(code, value, out.getvalue() + err.getvalue() + "\n".join(collect.lines))


HYDRA_COMMANDS = ("detkit-train", "detkit-pretrain", "detkit-eval", "detkit-predict", "detkit-export")


def compose_train(synthetic, *overrides: str, fast: list[str] = TINY_FRCNN):
    """The train config on the ``synthetic`` set, tiny (64 px, batches of 2) unless ``overrides`` say otherwise."""
    from hydra import compose, initialize_config_dir

    from detkit.paths import config_dir

    ann, root = synthetic
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[*data_args(ann, root), *fast, "data.image_size=64", "data.batch_size=2",
                                           "paths.output_dir=/tmp/x", *overrides])


def fit_steps(cfg, steps: int = 3, callbacks=(), model=None, **trainer_kw):
    """``(module, trainer)`` after ``steps`` training steps of ``cfg`` in this process (no validation, no files)."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = model or instantiate(cfg.model, categories=dm.categories.to_list(), image_size=cfg.data.image_size,
                                 _recursive_=False)
    kw = dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    kw.update(trainer_kw)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), **kw)
    trainer.fit(model, datamodule=dm)
    return model, trainer


class KillAtStep(L.Callback):
    """SIGKILL the training process when ``global_step`` reaches ``step``: no clean-up, no final checkpoint, as a
    power cut or an out-of-memory kill would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(L.Callback):
    """Append ``step image_ids pixel_sum box_sum`` per training batch to ``path`` (debugging determinism)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        images, targets = batch
        ids = targets.image_ids.tolist()
        boxes = float((targets.boxes * targets.valid[..., None]).sum())
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {ids} {int(images.long().sum())} {boxes:.3f}\n")


class PoisonAtStep(L.Callback):
    """Set the RPN's box-regression weights to +inf when ``global_step`` reaches ``step``: a stand-in for an
    optimiser step that blew the weights up (the next forward decodes non-finite proposals and losses)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            head = pl_module.detector.rpn.head.bbox_pred
            head.weight.data.fill_(float("inf"))
