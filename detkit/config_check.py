"""Unknown-key check for Hydra configs: a misspelled key is an error that names it and the closest valid key.

Hydra reports a misspelled *group* (``model=fastr_rcnn``) but not a misspelled *key* inside a node: with
``model.backbone_lr_mul=0.1`` (one letter short) ``hydra.utils.instantiate`` would pass an unexpected keyword, or,
worse, a constructor taking ``**kwargs`` would swallow it and train with the default. :func:`check_config_keys`
walks a composed config and compares every node that has a ``_target_`` with the signature of that target.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from detkit.errors import UserError


class ConfigKeyError(UserError, ValueError):
    """A config node names a key its ``_target_`` does not accept."""


def accepted_keys(target: Any) -> set[str] | None:
    """The keyword names ``target`` accepts, or ``None`` when it takes ``**kwargs`` (anything goes)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: nothing to check against
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _problems(node: Any, path: str) -> list[str]:
    out: list[str] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            out += _problems(item, f"{path}[{i}]")
        return out
    if not isinstance(node, dict):
        return out
    target = node.get("_target_")
    if isinstance(target, str) and "${" not in target:
        try:
            valid = accepted_keys(get_object(target))
        except Exception:  # noqa: BLE001 - an unimportable target is reported by instantiate itself
            valid = None
        if valid is not None:
            for key in node:
                if str(key).startswith("_") or key in valid:
                    continue
                name = f"{path}.{key}" if path else str(key)
                close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.6)
                hint = f"did you mean {path + '.' if path else ''}{close[0]}? " if close else ""
                out.append(f"unknown config key {name} ({target} takes no '{key}'): {hint}"
                           f"valid keys there: {', '.join(sorted(valid))}")
    for key, value in node.items():
        out += _problems(value, f"{path}.{key}" if path else str(key))
    return out


def check_config_keys(cfg: DictConfig | dict, path: str = "") -> None:
    """Raise :class:`ConfigKeyError` listing every key of ``cfg`` that its node's ``_target_`` does not accept.

    Keys starting with ``_`` (Hydra's ``_target_``, ``_partial_``, ...) are skipped, and so are nodes whose target
    accepts ``**kwargs``. Values are not resolved, so missing (``???``) values are fine here.
    """
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    problems = _problems(plain, path)
    if problems:
        raise ConfigKeyError("\n".join(problems))
