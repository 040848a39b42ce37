"""Shared plumbing of the Hydra entry points: start-up checks, clean errors, loggers and callbacks (the config
resolvers are registered where configs are composed or loaded: :mod:`detkit.run_config`)."""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from detkit.config_check import check_config_keys
from detkit.errors import USER_ERRORS, UserError

log = logging.getLogger("detkit")

def check_torchvision_ops(accelerator: str) -> None:
    """Fail early, with what to install, if torchvision's compiled ops do not run on the chosen device."""
    import torchvision

    device = "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) \
        else "cpu"
    try:
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)
        torchvision.ops.nms(boxes, torch.ones(1, device=device), 0.5)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken install
        raise RuntimeError(
            f"torchvision {torchvision.__version__}'s compiled ops do not run on {device} with torch "
            f"{torch.__version__} ({e}). Install a matching pair built for this device, e.g. "
            "`pip install torch==2.14.1 torchvision==0.29.1` (see pytorch.org for CUDA builds).") from e


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class MissingSettingError(UserError, ValueError):
    """A required setting (``???`` in the config) was not given."""


#: What to type for a missing setting, by key prefix.
SETTING_HINTS = {
    "data.": "Give your COCO dataset, e.g. data.train_ann=train.json data.train_images=IMAGES_DIR "
             "data.val_ann=val.json data.val_images=IMAGES_DIR (or data=bccd for the embedded demo dataset)",
    "semi.": "Give the folder of unlabeled images for self-training: semi.unlabeled_images=DIR",
}


def _literal_missing(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is literally ``???``, found without resolving anything (an interpolation that points at one,
    such as ``pretrain.data.images: ${data.train_images}``, is reported through its target)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _literal_missing(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _literal_missing(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def check_required_settings(cfg: DictConfig) -> None:
    """Refuse a config with required settings left unset (``???``), naming each and what to give, before any
    work starts (rather than an ``omegaconf`` error from wherever the first one is read)."""
    missing = sorted(_literal_missing(OmegaConf.to_container(cfg, resolve=False)))
    if not missing:
        return
    hints = sorted({h for key in missing for prefix, h in SETTING_HINTS.items() if key.startswith(prefix)})
    raise MissingSettingError(f"required setting{'s' if len(missing) > 1 else ''} not given: {', '.join(missing)}"
                              + (f". {' '.join(hints)}" if hints else ""))


def clean_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run an entry point with clean failure handling.

    Every key of the config is first checked against its node's ``_target_`` (:mod:`detkit.config_check`), so a
    misspelled key stops the run before anything is built.
    Single run: a user-input error (:class:`detkit.errors.UserError`, a missing file) is one message and exit
    status 1 (other errors keep their traceback).
    Multirun: any error is logged and recorded in the job directory (``job_status.json``) and the job returns NaN,
    so the other jobs go on and the sweep summary lists this one as failed (see :mod:`detkit.cli.sweep`).
    """

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        from detkit.cli.sweep import write_job_status

        start = time.time()
        multirun = is_multirun()
        try:
            check_required_settings(cfg)
            check_config_keys(cfg)
            result = fn(cfg)
        except USER_ERRORS as e:
            if multirun:
                log.error("job failed: %s", e)
                write_job_status(output_dir(), "failed", time.time() - start, f"{type(e).__name__}: {e}")
                return float("nan")
            log.error("error: %s", e)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - in a sweep, one job's crash must not erase the others
            if not multirun:
                raise
            log.exception("job failed")
            write_job_status(output_dir(), "failed", time.time() - start, f"{type(e).__name__}: {e}")
            return float("nan")
        if multirun:
            write_job_status(output_dir(), "completed", time.time() - start)
        return result

    return wrapper


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every node of a ``{name: {_target_: ...}}`` group (loggers, callbacks)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
