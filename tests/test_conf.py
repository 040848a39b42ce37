"""One source for each default (issue 30 item 5): every ``_target_`` in ``conf/`` instantiates, and a detkit class's
code defaults never disagree with the YAML that configures it.

The rule the second test enforces: for every detkit class the shipped configs build, each parameter the YAML sets
that also has a default in the code must have, as that default, one of the values the default configurations give
it (a class configured twice in one run, such as the train and eval transforms, or by both detectors, such as the
backbone's neck, may take either). Variant files of a group (``optimizer=adamw``, ``scheduler=step``,
``backbone=resnet18_c4``) change settings on purpose and are not defaults.
"""

from __future__ import annotations

import inspect
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from detkit.paths import config_dir

CONF = config_dir()
#: The default configurations of every command (each detector is a default: model= has no "base" choice).
DEFAULTS = [("train", []), ("train", ["model=yolo"]), ("pretrain", []), ("eval", [])]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def _targets(node, path=""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}.{i}")


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value) if isinstance(value, (int, float)) else value


def test_code_defaults_agree_with_the_yaml():
    given: dict[tuple[str, str], list] = {}
    for name, overrides in DEFAULTS:
        raw = OmegaConf.to_container(_compose(name, overrides), resolve=False)
        for _, node in _targets(raw):
            if not node["_target_"].startswith("detkit."):
                continue
            for key, value in node.items():
                if not key.startswith("_") and value != "???" and not (isinstance(value, str) and "${" in value):
                    given.setdefault((node["_target_"], key), []).append(_plain(value))
    assert given, "no detkit _target_ found"
    disagree = []
    for (target, key), values in sorted(given.items()):
        param = inspect.signature(get_object(target)).parameters.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            continue
        default = _plain(param.default)
        if any(isinstance(v, dict) and "_target_" in v for v in values):  # a nested node: checked on its own
            continue
        if default not in values:
            disagree.append(f"{target}({key}=...): code {param.default!r}, YAML {values}")
    assert not disagree, "code defaults that disagree with conf/:\n" + "\n".join(disagree)


def test_simclr_optimizer_and_schedule_defaults_are_the_yamls():
    """SimCLRModule's optimizer and scheduler defaults are built in its body (dicts), where the signature check
    cannot see them; the YAML takes them from the optimizer/scheduler groups detection uses."""
    from detkit.lit.pretrain_module import SimCLRModule

    model = _compose("pretrain", []).model
    hparams = SimCLRModule(proj_hidden=8, proj_dim=4).hparams
    assert hparams.optimizer == OmegaConf.to_container(model.optimizer)
    assert hparams.scheduler == OmegaConf.to_container(model.scheduler)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _instantiate_train(cfg) -> None:
    """Every _target_ node of a composed train config, built as detkit-train builds it."""
    module = instantiate(cfg.model, categories=CATEGORIES, image_size=64, seed=0, _recursive_=False)
    params = [p for p in module.parameters() if p.requires_grad][:2]
    instantiate(cfg.model.optimizer, params=params)
    instantiate(cfg.model.scheduler)
    instantiate(cfg.data)
    for group in ("logger", "callbacks"):
        for node in (cfg.get(group) or {}).values():
            if node is not None:
                instantiate(node)


@pytest.mark.parametrize("override", [
    *(f"model={m}" for m in _group_options("model")),
    *(f"backbone@model.detector.backbone={b}" for b in _group_options("backbone")),
    *(f"optimizer={o}" for o in _group_options("optimizer")),
    *(f"scheduler={s}" for s in _group_options("scheduler")),
    *(f"callbacks={c}" for c in _group_options("callbacks")),
    *(f"logger={lg}" for lg in _group_options("logger")),
])
def test_every_train_target_instantiates(override, tmp_path):
    if "timm" in override:
        pytest.importorskip("timm")
    extra = ["model=yolo"] if override.endswith("_pan") else []
    if override.endswith("resnet18_c4"):  # one feature map: one level of anchors (README, "Swappable parts")
        extra = ["model.detector.rpn.anchor_generator.sizes=[[32,64,128]]",
                 "model.detector.rpn.anchor_generator.aspect_ratios=[[0.5,1.0,2.0]]"]
    cfg = _compose("train", ["data=bccd", *extra, override, f"paths.output_dir={tmp_path}"])
    _instantiate_train(cfg)


@pytest.mark.parametrize("trainer", _group_options("trainer"))
def test_every_trainer_config_composes_and_names_a_trainer(trainer, tmp_path):
    """CPU trainers are built; the GPU ones (no GPU here) are composed and their target resolved."""
    cfg = _compose("train", ["data=bccd", f"trainer={trainer}", f"paths.output_dir={tmp_path}"])
    assert get_object(cfg.trainer._target_) is not None and cfg.trainer.accelerator in ("gpu", "cpu")
    if cfg.trainer.accelerator == "cpu":
        instantiate(cfg.trainer, logger=False, callbacks=None)


@pytest.mark.parametrize("job", _group_options("pretrain_job"))
def test_every_pretrain_target_instantiates(job):
    cfg = _compose("pretrain", [f"pretrain_job={job}"])
    instantiate(cfg.model)
    instantiate(cfg.data)
    instantiate(cfg.trainer, logger=False)


def test_eval_targets_instantiate():
    cfg = _compose("eval", ["data.val_ann=x.json", "data.val_images=x", "device=cpu"])
    instantiate(cfg.data, image_size=64)  # null: detkit-eval fills in the checkpoint's size first
    instantiate(cfg.trainer)
