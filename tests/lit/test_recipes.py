"""The training toolbox as configs: every optimiser and schedule option trains, schedules follow their formulas,
L1 penalty, freezing, early stopping and the learning-rate plot."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from detkit.cli.train import stop_reason
from detkit.lit.detection_module import freeze_parameters
from detkit.lit.optim import WarmupSchedule, module_lr_mults, param_groups
from detkit.paths import config_dir
from tests.helpers import TINY, TINY_FRCNN, cli, compose_train, data_args, fit_steps

OPTIMIZERS = sorted(p.stem for p in (config_dir() / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (config_dir() / "scheduler").glob("*.yaml"))


def test_the_groups_hold_the_course_toolbox():
    assert set(OPTIMIZERS) >= {"sgd", "adagrad", "rmsprop", "adam", "nadam", "adamw", "lars"}
    assert set(SCHEDULERS) >= {"step", "multistep", "exponential", "inverse_time", "inverse_sqrt", "cosine",
                               "one_cycle"}


@pytest.mark.parametrize("option", [f"optimizer={o}" for o in OPTIMIZERS] + [f"scheduler={s}" for s in SCHEDULERS])
def test_every_option_trains_a_few_steps(synthetic, option):
    cfg = compose_train(synthetic, option)
    model, trainer = fit_steps(cfg, steps=3)
    assert trainer.global_step == 3
    opt = trainer.optimizers[0]
    # norm/bias tensors never decay, whatever the optimiser
    assert any(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert all(torch.isfinite(p).all() for p in model.detector.parameters())


@pytest.mark.parametrize("kind,kw,expected", [
    # T = 110 steps, warm-up W = 10 steps from factor 0.1: warm(t) = 0.1 + 0.9 t / 10
    ("constant", {}, {0: 0.1, 5: 0.55, 10: 1.0, 99: 1.0}),
    ("step", {"gamma": 0.5, "period": 20}, {10: 1.0, 29: 1.0, 30: 0.5, 50: 0.25, 99: 0.5 ** 4}),
    ("multistep", {"milestones": (0.5, 80), "gamma": 0.1}, {54: 1.0, 55: 0.1, 80: 0.01}),
    ("exponential", {"gamma": 0.5, "period": 30}, {10: 1.0, 40: 0.5, 70: 0.25, 55: 0.5 ** 1.5}),
    ("inverse_time", {"decay_rate": 2.0, "period": 10}, {10: 1.0, 20: 1 / 3, 60: 1 / 11}),
    ("inverse_sqrt", {"period": 5}, {10: 1.0, 15: 1 / math.sqrt(2), 50: 1 / 3}),
    ("cosine", {"min_ratio": 0.2}, {10: 1.0, 35: 0.2 + 0.4 * (1 + math.cos(math.pi / 4)), 60: 0.6}),
])
def test_each_schedule_follows_its_formula(kind, kw, expected):
    schedule = WarmupSchedule(kind, warmup=10, warmup_factor=0.1, **kw)
    curve = schedule.curve(110, lr=2.0)
    for step, factor in expected.items():
        assert curve[step] == pytest.approx(2.0 * factor, rel=1e-6), (kind, step)
    assert curve[5] == pytest.approx(2.0 * (0.1 + 0.9 * 5 / 10))  # the same linear warm-up for all


def test_one_cycle_rises_linearly_then_falls_linearly_and_cycles_momentum():
    schedule = WarmupSchedule("one_cycle", warmup=0.3, warmup_factor=0.04, min_ratio=1e-4)
    curve = schedule.curve(100, lr=1.0)
    assert curve[0] == pytest.approx(0.04) and curve[29] == pytest.approx(1.0)
    assert curve[14] == pytest.approx(0.04 + 0.96 * 14 / 29)  # torch's phase ends at pct_start * T - 1
    assert curve[99] == pytest.approx(1e-4) and curve[64] == pytest.approx(1.0 - (1 - 1e-4) * 35 / 70)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    sched = schedule.build(opt, 100)
    moms = []
    for _ in range(100):
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert moms[0] == pytest.approx(0.95) and moms[29] == pytest.approx(0.85)  # momentum low at the lr peak


def test_l1_penalty_is_the_sum_of_absolute_weights(synthetic):
    cfg = compose_train(synthetic, "model.l1_penalty=1e-5")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, categories=dm.categories.to_list(), _recursive_=False)
    params = list(model.detector.parameters())
    manual = sum(p.double().abs().sum() for p in params if p.ndim > 1).item()  # exact enough: float64
    # l1_norm sums ~1.2e7 weights in fp32 through torch's CPU 1-norm kernel, whose accumulation error grows with the
    # elements per thread: -2e-4 of the sum with 1 thread (-4e-4 on each 2.4M-weight tensor), -5e-5 with 2. So the
    # tolerance is relative to the sum, at 1e-3; the bugs this guards are far larger: counting the ndim <= 1
    # parameters too (biases, norm scales) adds ~2% (asserted below, so the check keeps its power), an L2 norm or a
    # missing layer group is off by orders of magnitude.
    rel = 1e-3
    assert model.l1_norm().item() == pytest.approx(manual, rel=rel)
    with_1d = manual + sum(p.double().abs().sum() for p in params if p.ndim <= 1).item()
    assert with_1d - manual > 10 * rel * manual
    model, trainer = fit_steps(cfg, steps=2)
    assert trainer.global_step == 2


def test_freezing_by_prefix_trains_only_the_rest(synthetic):
    cfg = compose_train(synthetic, "model.freeze=[backbone,rpn]")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, categories=dm.categories.to_list(), _recursive_=False)
    frozen = {n: p.detach().clone() for n, p in model.detector.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.", "rpn.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.detector.named_parameters() if n.startswith("roi_heads."))
    model, _ = fit_steps(cfg, steps=2, model=model)
    now = dict(model.detector.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    with pytest.raises(ValueError, match="names no parameter.*'roi_heads'"):
        freeze_parameters(model.detector, ["roi_head"])


def test_early_stopping_stops_on_val_ap_and_says_why(synthetic):
    cfg = compose_train(synthetic, "callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                        "callbacks.early_stopping.min_delta=2.0")  # an AP gain of 2 is impossible: stops early
    stopper = instantiate(cfg.callbacks.early_stopping)
    _, trainer = fit_steps(cfg, steps=-1, callbacks=[stopper], max_epochs=6, limit_val_batches=1.0,
                           limit_train_batches=1)
    reason = stop_reason(trainer)
    assert reason["by"] == "early_stopping" and reason["epoch"] == 1 < 5
    assert "val/AP" in reason["reason"]


def test_plot_lr_writes_the_curve_and_trains_nothing(synthetic, tmp_path):
    ann, root = synthetic
    out = tmp_path / "lr"
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, "scheduler=one_cycle", "plot_lr=true",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output
    rows = (out / "lr_schedule.csv").read_text().splitlines()
    assert rows[0] == "step,lr" and len(rows) == 1 + 2  # 8 images / batch 4 = 2 steps, 1 epoch
    assert (out / "lr_schedule.png").is_file() and not (out / "checkpoints").exists()


def test_linear_lr_scaling_from_a_reference_batch(synthetic):
    cfg = compose_train(synthetic, "model.lr_reference_batch=8", "model.optimizer.lr=0.02",
                        "model.head_lr_mult=1.0")  # batch 2, one rate for every parameter
    _, trainer = fit_steps(cfg, steps=1, accumulate_grad_batches=2)  # effective batch 4 = half the reference
    assert [g["initial_lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([0.01] * len(trainer.optimizers[0].param_groups))


def test_param_groups_take_the_longest_matching_prefix_and_never_decay_norms():
    net = torch.nn.ModuleDict({"head": torch.nn.ModuleDict({"cls": torch.nn.Linear(2, 3), "reg": torch.nn.Linear(2, 4)})})
    groups = param_groups(net.named_parameters(), 1e-4, 1.0, {"head.": 0.5, "head.cls.": 0.25})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    head = net["head"]
    assert lr_of[id(head["cls"].weight)] == lr_of[id(head["cls"].bias)] == 0.25  # the longer prefix wins
    assert lr_of[id(head["reg"].weight)] == lr_of[id(head["reg"].bias)] == 0.5
    assert decay_of[id(head["cls"].weight)] == 1e-4 and decay_of[id(head["cls"].bias)] == 0.0


def test_module_lr_mults_reject_a_path_that_names_no_parameter():
    net = torch.nn.ModuleDict({"roi_heads": torch.nn.ModuleDict({"box_predictor": torch.nn.Linear(2, 3)})})
    assert module_lr_mults(net, {"roi_heads.box_predictor": 0.25}) == {"roi_heads.box_predictor.": 0.25}
    # "roi_heads.box" is a prefix of the parameter names as text but not a module: it must not match
    for bad in ("roi_heads.box", "roi_head", "box_predictor"):
        with pytest.raises(ValueError, match=f"'{bad}'.*no parameter.*roi_heads"):
            module_lr_mults(net, {bad: 0.5})
    with pytest.raises(ValueError, match=">= 0"):
        module_lr_mults(net, {"roi_heads": -1.0})


@pytest.mark.parametrize("model,path", [("faster_rcnn", "roi_heads.box_predictor"), ("yolo", "head")])
def test_lr_mults_set_each_modules_rate_and_the_rest_keep_the_base_rate(synthetic, model, path):
    cfg = compose_train(synthetic, f"model={model}", "model.optimizer.lr=0.02", "model.backbone_lr_mult=0.5",
                        "model.head_lr_mult=1.0", f"model.lr_mults={{{path}:0.25}}",
                        fast=TINY if model == "yolo" else TINY_FRCNN)
    assert cfg.model.detector._target_.rsplit(".", 1)[1] == {"yolo": "YOLO", "faster_rcnn": "FasterRCNN"}[model]
    module, trainer = fit_steps(cfg, steps=1)
    target = dict(module.detector.named_modules())[path]
    chosen = {id(p) for p in target.parameters()}
    encoder = {id(p) for p in module.detector.backbone.encoder.parameters()}
    assert chosen and encoder
    for group in trainer.optimizers[0].param_groups:
        for p in group["params"]:
            expected = 0.25 if id(p) in chosen else 0.5 if id(p) in encoder else 1.0
            assert group["initial_lr"] == pytest.approx(0.02 * expected)


def test_a_misspelt_lr_mults_path_fails_before_training(synthetic, tmp_path):
    ann, root = synthetic
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, "model.lr_mults={roi_heads.box_predicter:0.25}",
            f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 1
    assert "'roi_heads.box_predicter': no parameter of the FasterRCNN" in r.output, r.output
    assert "Traceback" not in r.output and "Error in call to target" not in r.output, r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("model,head", [("faster_rcnn", "roi_heads"), ("yolo", "head")])
def test_the_box_head_rate_defaults_to_a_quarter_for_faster_rcnn_only(synthetic, model, head):
    """Faster R-CNN's RoI heads learn at 0.25 x the base rate by default (``head_lr_mult``, issue 34), YOLO's head
    at the base rate; every other parameter keeps the base rate, and ``model.head_lr_mult=1.0`` restores one rate."""
    expected_mult = {"faster_rcnn": 0.25, "yolo": 1.0}[model]
    for extra, mult in (((), expected_mult), (("model.head_lr_mult=1.0",), 1.0)):
        cfg = compose_train(synthetic, f"model={model}", "model.optimizer.lr=0.02", *extra,
                            fast=TINY if model == "yolo" else TINY_FRCNN)
        module, trainer = fit_steps(cfg, steps=1)
        in_head = {id(p) for p in getattr(module.detector, head).parameters()}
        assert in_head and module.detector.HEAD == head
        rates = {id(p): g["initial_lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
        assert len(rates) == sum(1 for p in module.detector.parameters() if p.requires_grad)
        for pid, lr in rates.items():
            assert lr == pytest.approx(0.02 * (mult if pid in in_head else 1.0)), (extra, lr)


def test_an_lr_mults_entry_overrides_backbone_lr_mult_and_the_longest_path_wins_in_a_detector(synthetic):
    cfg = compose_train(synthetic, "model.optimizer.lr=0.02", "model.backbone_lr_mult=0.5",
                        "model.lr_mults={backbone.encoder:0.1,roi_heads:0.5,roi_heads.box_predictor:0.25}")
    module, trainer = fit_steps(cfg, steps=1)
    det = module.detector
    expected = {**{id(p): 1.0 for p in det.parameters()},
                **{id(p): 0.1 for p in det.backbone.encoder.parameters()},   # the explicit entry, not 0.5
                **{id(p): 0.5 for p in det.roi_heads.parameters()},
                **{id(p): 0.25 for p in det.roi_heads.box_predictor.parameters()}}
    seen = set()
    for group in trainer.optimizers[0].param_groups:
        for p in group["params"]:
            assert group["initial_lr"] == pytest.approx(0.02 * expected[id(p)])
            seen.add(id(p))
    assert {id(p) for p in det.roi_heads.box_head.parameters()} <= seen  # the 0.5 group is not empty


def test_resuming_with_a_differently_shaped_model_names_the_settings_and_changed_rates_are_warned(synthetic,
                                                                                                    tmp_path):
    """A checkpoint of a 64-wide box head (with an EMA, whose state is no tensor) resumed under a config that builds
    a 32-wide one, or other optimiser groups: one clear error naming the setting, before training (not Lightning's
    size-mismatch traceback). An unchanged resume warns about nothing; a changed learning rate is not silently
    ignored: a warning says the saved rate is kept, and it is."""
    ann, root = synthetic
    run = tmp_path / "run"
    common = [*data_args(ann, root), *TINY_FRCNN, "report=false", "model.ema_decay=0.9", f"hydra.run.dir={run}"]
    r = cli("detkit-train", *common)
    assert r.returncode == 0 and (run / "checkpoints" / "last.ckpt").is_file(), r.output
    r = cli("detkit-train", *common, "ckpt_path=last", "model.detector.roi_heads.box_head.hidden=32")
    assert r.returncode == 1, r.output
    assert "cannot resume from" in r.output and "roi_heads.box_head.fc6.weight" in r.output, r.output
    assert "model.detector.roi_heads.box_head.hidden: 64 in the checkpoint, 32 now" in r.output, r.output
    r = cli("detkit-train", *common, "ckpt_path=last", "model.lr_mults={rpn:0.5}")
    assert r.returncode == 1, r.output
    assert "parameter groups" in r.output and "model.lr_mults.rpn: '(absent)' in the checkpoint" in r.output
    r = cli("detkit-train", *common, "ckpt_path=last", "trainer.max_epochs=2")
    assert r.returncode == 0 and "differs" not in r.output and "in the checkpoint" not in r.output, r.output
    r = cli("detkit-train", *common, "ckpt_path=last", "trainer.max_epochs=3", "model.optimizer.lr=0.005")
    assert r.returncode == 0, r.output
    assert "model.optimizer.lr: 0.02 in the checkpoint, 0.005 now" in r.output, r.output
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # a checkpoint saved before head_lr_mult existed trained the head at the base rate: resuming it under the new
    # default names the setting with the value to give (1.0), and that value resumes it
    old = tmp_path / "old.ckpt"
    legacy = cli("detkit-train", *[a for a in common if not a.startswith("hydra.run.dir")], "model.head_lr_mult=1.0",
                 f"hydra.run.dir={tmp_path / 'legacy'}")
    assert legacy.returncode == 0, legacy.output
    ckpt = torch.load(tmp_path / "legacy" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["hyper_parameters"]["head_lr_mult"]
    torch.save(ckpt, old)
    r = cli("detkit-train", *common, f"ckpt_path={old}", "trainer.max_epochs=2")
    assert r.returncode == 1 and "model.head_lr_mult: 1.0 in the checkpoint, 0.25 now" in r.output, r.output
    r = cli("detkit-train", *common, f"ckpt_path={old}", "trainer.max_epochs=2", "model.head_lr_mult=1.0")
    assert r.returncode == 0, r.output
    # as the warning says: the saved rates (0.02, and 0.005 for the RoI heads at head_lr_mult 0.25), not 0.005 x
    assert {g["initial_lr"] for g in state["optimizer_states"][0]["param_groups"]} == {0.02, 0.005}
