"""detkit's config resolvers, and loading a run's saved config.

The config tree uses two custom resolvers: ``${detkit_data:}`` (the embedded data folder) and ``${detkit_mul:a,b}``
(a product, e.g. steps x scale). Whatever composes or loads a detkit config registers them first:
:func:`detkit.paths.config_dir` (every Hydra entry point composes from it) and :func:`load_run_config` (a run's
saved ``.hydra/config.yaml``, which keeps those interpolations unresolved), so no command depends on another module
having been imported for its side effects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: Hydra's run directory as the saved config refers to it; resolvable only inside that Hydra run.
_HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def _default_data_dir() -> str:
    """The repository's embedded ``data/`` (a source checkout or editable install), else ``./data``."""
    repo_data = Path(__file__).resolve().parents[1] / "data"
    return str(repo_data if repo_data.is_dir() else Path.cwd() / "data")


def _product(*values: float) -> float:
    out = 1
    for v in values:
        out *= v
    return out


#: Below this many images per device a batch's statistics are too noisy for BatchNorm (Wu & He 2018, GroupNorm).
MIN_BATCHNORM_BATCH = 16

#: A ``data.holdout_fraction`` run's scored images' COCO ground truth, written beside its ``metrics.json``.
HOLDOUT_GT = "holdout_ground_truth.json"


def norm_for_batch(batch_size: int) -> str:
    """``"bn"`` from :data:`MIN_BATCHNORM_BATCH` images per device up, ``"gn"`` (GroupNorm) below."""
    return "bn" if int(batch_size) >= MIN_BATCHNORM_BATCH else "gn"


def register_resolvers() -> None:
    """Register ``${detkit_data:}``, ``${detkit_mul:a,b}`` and ``${detkit_norm_for_batch:n}`` with OmegaConf
    (idempotent)."""
    for name, fn in (("detkit_data", _default_data_dir), ("detkit_mul", _product),
                     ("detkit_norm_for_batch", norm_for_batch)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _pin(node: Any, run_dir: str) -> Any:
    """``node`` (plain containers) with every ``${hydra:runtime.output_dir}`` replaced by ``run_dir``."""
    if isinstance(node, dict):
        return {k: _pin(v, run_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [_pin(v, run_dir) for v in node]
    if isinstance(node, str):
        return node.replace(_HYDRA_OUTPUT_DIR, run_dir)
    return node


def load_run_config(run: str | Path) -> DictConfig:
    """The saved config of a detkit run (``run`` is the run directory or its ``config.yaml``), resolvable in any
    process: detkit's resolvers are registered, and Hydra's run directory (``${hydra:runtime.output_dir}``, known
    only while that run was going) is the run directory. An empty config if the run has none."""
    run = Path(run)
    path = run if run.is_file() else run / ".hydra" / "config.yaml"
    run_dir = path.parent.parent if path.parent.name == ".hydra" else path.parent
    register_resolvers()
    if not path.is_file():
        return OmegaConf.create({})
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a detkit run config (a mapping)")
    return OmegaConf.create(_pin(raw, str(run_dir)))
