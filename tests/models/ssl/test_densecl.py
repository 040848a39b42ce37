"""DenseCL: cell correspondence on hand-built grids, the dense loss at its known values, the batched loss against a
per-image loop (also as one rank of a 2-process gather), gradients, a sync-free step, and a real pretraining run
whose encoder file loads into a detector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detkit.models.ssl import densecl
from detkit.models.ssl.densecl import DenseCLLoss, DenseContrastiveLoss, DenseProjector, dense_correspondence
from detkit.models.ssl.simclr import NTXentLoss


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- correspondence -------------------------------------------------------------------------------------------------

def test_correspondence_undoes_a_horizontal_flip_of_the_grid():
    b1 = _rand(2, 8, 3, 4)
    idx12, idx21 = dense_correspondence(b1, b1.flip(-1))
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    flipped = (rows * 4 + (3 - cols)).flatten()  # cell (r, c) of view 1 is cell (r, W - 1 - c) of view 2
    assert torch.equal(idx12, flipped.expand(2, -1)) and torch.equal(idx21, flipped.expand(2, -1))


def test_correspondence_undoes_a_permutation_of_cells_and_ignores_their_norms():
    b1 = _rand(3, 6, 2, 3, seed=1)
    perm = torch.tensor([4, 0, 5, 1, 3, 2])  # view 2's cell j is view 1's cell perm[j]
    b2 = b1.flatten(2)[:, :, perm] * (0.1 + _rand(3, 1, 6, seed=2).abs())  # cosine: positive scales do not matter
    idx12, idx21 = dense_correspondence(b1, b2.view(3, 6, 2, 3))
    assert torch.equal(idx12, torch.argsort(perm).expand(3, -1))  # view 1's cell i went to position argsort(perm)[i]
    assert torch.equal(idx21, perm.expand(3, -1))


def test_correspondence_between_grids_of_different_sizes():
    b1 = _rand(1, 4, 2, 2, seed=3)
    b2 = torch.cat([b1, -b1], dim=3)  # view 2 is 2x4: view 1's cells at columns 0-1, their negatives at 2-3
    idx12, idx21 = dense_correspondence(b1, b2)
    assert torch.equal(idx12, torch.tensor([[0, 1, 4, 5]]))
    assert idx21.shape == (1, 8) and torch.equal(idx21[0, [0, 1, 4, 5]], torch.tensor([0, 1, 2, 3]))


# --- dense loss: known values ---------------------------------------------------------------------------------------

def _one_hot_grids(n: int, h: int, w: int) -> torch.Tensor:
    """``[n, n*h*w, h, w]``: every cell of every image its own basis vector (distinct, orthogonal features)."""
    s = h * w
    return torch.eye(n * s).view(n * s, n, s).permute(1, 0, 2).reshape(n, n * s, h, w)


@pytest.mark.parametrize("tau", [0.05, 0.2])
def test_dense_loss_is_near_zero_for_aligned_distinct_features_and_chance_for_shuffled_ones(tau):
    n, h, w = 4, 2, 2
    d = _one_hot_grids(n, h, w)
    ident = torch.arange(h * w).expand(n, -1)
    aligned = DenseContrastiveLoss(tau)(d, d.clone(), ident, ident)
    # positive similarity 1, every other image's pooled vector orthogonal: -log(e^(1/t) / (e^(1/t) + (2N-2) e^0))
    assert aligned.item() == pytest.approx(math.log1p((2 * n - 2) * math.exp(-1 / tau)), rel=1e-5, abs=1e-7)
    assert aligned.item() < 0.05
    shuffled = d.flatten(2).roll(1, dims=2).view_as(d)  # every cell's partner is another cell: similarity 0
    chance = DenseContrastiveLoss(tau)(d, shuffled, ident, ident)
    assert chance.item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)  # 1 positive + 2N-2 negatives, all equal


def test_densecl_loss_matches_cells_by_backbone_features_not_by_position():
    """View 2 is view 1 flipped: with the flipped backbone maps the matching finds the partners (loss at its
    aligned value); with unflipped backbone maps it pairs cells by position and the loss is at chance."""
    n, h, w, tau = 3, 2, 4, 0.1  # an even width: no cell is its own mirror image
    d1 = _one_hot_grids(n, h, w)
    b1 = _rand(n, 16, h, w, seed=4)
    z = _rand(n, 8, seed=5)
    crit = DenseCLLoss(tau, dense_weight=0.5)
    good = crit(z, z, d1, d1.flip(-1), b1, b1.flip(-1))
    wrong = crit(z, z, d1, d1.flip(-1), b1, b1)
    assert good["loss_dense"].item() == pytest.approx(math.log1p((2 * n - 2) * math.exp(-1 / tau)), abs=1e-6)
    assert wrong["loss_dense"].item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)  # no flipped cell is in place
    g = NTXentLoss(tau)(z, z)
    torch.testing.assert_close(good["loss_global"], g)
    torch.testing.assert_close(good["loss"], 0.5 * g + 0.5 * good["loss_dense"])


# --- dense loss: batched = per-image loop ---------------------------------------------------------------------------

def loop_dense_loss(d1, d2, b1, b2, tau, extra_pooled=None):
    """The dense loss one image, one view and one cell at a time; ``extra_pooled``: pooled dense vectors of other
    processes' images (negatives only)."""
    n = len(d1)
    pooled = [F.normalize(d.mean((1, 2)), dim=0) for d in (*d1, *d2)]  # index v * n + image
    others = [] if extra_pooled is None else list(F.normalize(extra_pooled, dim=1))
    terms = []
    for a, (qa, ka, ba, bb) in enumerate(((d1, d2, b1, b2), (d2, d1, b2, b1))):
        for img in range(n):
            q = qa[img].flatten(1)  # [D, S]
            k = ka[img].flatten(1)
            fq, fk = ba[img].flatten(1), bb[img].flatten(1)
            negatives = [pooled[v * n + u] for v in range(2) for u in range(n) if u != img] + others
            for i in range(q.shape[1]):
                sims = [F.cosine_similarity(fq[:, i], fk[:, j], dim=0) for j in range(fk.shape[1])]
                j = max(range(len(sims)), key=lambda t: (sims[t].item(), -t))  # first maximum
                qi = F.normalize(q[:, i], dim=0)
                pos = qi @ F.normalize(k[:, j], dim=0) / tau
                negs = torch.stack([qi @ p / tau for p in negatives])
                terms.append(torch.logsumexp(torch.cat([pos[None], negs]), 0) - pos)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("shape", [(3, 3, 3), (2, 2, 3)])
def test_batched_dense_loss_equals_the_per_image_loop(shape):
    n, h, w = shape
    d1, d2 = _rand(n, 5, h, w, seed=6), _rand(n, 5, h, w, seed=7)
    b1, b2 = _rand(n, 4, h, w, seed=8), _rand(n, 4, h, w, seed=9)
    batched = DenseContrastiveLoss(0.3)(d1, d2, *dense_correspondence(b1, b2))
    torch.testing.assert_close(batched, loop_dense_loss(d1, d2, b1, b2, 0.3), rtol=1e-5, atol=1e-6)


def test_batched_dense_loss_as_rank_1_of_a_2_process_gather_equals_the_loop(monkeypatch):
    """Under DDP the pooled negatives of every process are gathered; this process's own images sit at offset
    ``rank * 2N``. Simulated: rank 1 of 2, rank 0's pooled vectors in front."""
    n, h, w = 2, 2, 2
    d1, d2 = _rand(n, 6, h, w, seed=10), _rand(n, 6, h, w, seed=11)
    b1, b2 = _rand(n, 4, h, w, seed=12), _rand(n, 4, h, w, seed=13)
    rank0 = F.normalize(_rand(2 * n, 6, seed=14), dim=1)
    monkeypatch.setattr(densecl, "gather_with_grad", lambda z: (torch.cat([rank0, z]), 1))
    batched = DenseContrastiveLoss(0.2)(d1, d2, *dense_correspondence(b1, b2))
    torch.testing.assert_close(batched, loop_dense_loss(d1, d2, b1, b2, 0.2, extra_pooled=rank0), rtol=1e-5,
                               atol=1e-6)


def test_bad_temperature_and_weight_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        DenseContrastiveLoss(0.0)
    with pytest.raises(ValueError, match="dense_weight"):
        DenseCLLoss(0.2, dense_weight=1.5)


# --- module --------------------------------------------------------------------------------------------------------

def _module(**kw):
    from detkit.lit.pretrain_module import DenseCLModule

    torch.manual_seed(0)
    return DenseCLModule(small_stem=True, proj_hidden=32, proj_dim=16, **kw)


def test_dense_projector_is_two_1x1_convolutions_around_a_relu():
    proj = DenseProjector(64, 32, 16)
    assert [type(m).__name__ for m in proj.net] == ["Conv2d", "ReLU", "Conv2d"]
    assert all(m.kernel_size == (1, 1) for m in proj.net if isinstance(m, torch.nn.Conv2d))
    assert proj(torch.randn(2, 64, 3, 5)).shape == (2, 16, 3, 5)


def test_gradient_reaches_the_encoder_and_both_projectors():
    module = _module()
    views = torch.rand(2, 4, 3, 24, 24) * 255
    out = module.forward_views(views[0], views[1])
    assert set(out) == {"loss", "loss_global", "loss_dense"} and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name in ("encoder.conv1.weight", "encoder.layer4.1.conv2.weight", "projector.net.0.weight",
                 "dense_projector.net.0.weight", "dense_projector.net.2.weight"):
        grad = dict(module.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_with_dense_weight_0_the_loss_is_simclrs():
    from detkit.lit.pretrain_module import SimCLRModule

    module = _module(dense_weight=0.0)
    simclr = SimCLRModule(small_stem=True, proj_hidden=32, proj_dim=16)
    simclr.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("dense_projector")})
    v1, v2 = torch.rand(2, 4, 3, 16, 16) * 255
    z = simclr.projector(simclr.encoder(torch.cat([v1, v2])))
    torch.testing.assert_close(module.forward_views(v1, v2)["loss"], simclr.criterion(*z.chunk(2)))
    assert module.hparams.dense_weight == 0.0 and module.hparams.dense_dim == 16 and module.method == "densecl"


def test_a_densecl_step_has_no_host_synchronisation():
    from detkit.host_sync import HostSyncCounter

    module = _module()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    views = torch.rand(2, 4, 3, 16, 16)
    for _ in range(2):
        with HostSyncCounter() as sync:
            loss = module.forward_views(views[0], views[1])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert sync.total == 0, (dict(sync.counts), dict(sync.sites))


def test_pretrain_job_densecl_config_is_simclrs_plus_the_dense_options_and_typos_are_named():
    from hydra import compose, initialize_config_dir

    from detkit.config_check import ConfigKeyError, check_config_keys
    from detkit.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        simclr = compose("pretrain")
        dense = compose("pretrain", overrides=["pretrain_job=densecl", "model.temperature=0.3"])
        typo = compose("pretrain", overrides=["pretrain_job=densecl", "+model.dense_wieght=0.3"])
        pipeline = compose("train", overrides=["experiment=pipeline", "pretrain_job@pretrain=densecl",
                                               "paths.output_dir=/tmp/x"])
    assert simclr.model._target_.endswith("SimCLRModule") and dense.model._target_.endswith("DenseCLModule")
    extra = {"_target_", "dense_weight", "dense_hidden", "dense_dim"}
    assert {k: v for k, v in dense.model.items() if k not in extra} == \
        {k: v for k, v in simclr.model.items() if k not in extra} | {"temperature": 0.3}
    assert dense.data == simclr.data and dense.model.dense_weight == 0.5
    check_config_keys(dense)
    with pytest.raises(ConfigKeyError, match="did you mean model.dense_weight"):
        check_config_keys(typo)
    assert pipeline.pretrain.model._target_.endswith("DenseCLModule") and pipeline.pretrain.data.image_size == 64
    assert pipeline.model._target_.endswith("DetectionModule")  # the job stays under `pretrain:`


# --- a real run ----------------------------------------------------------------------------------------------------

def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, base in (("dark", 40), ("bright", 210)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(root / name / f"{i}.png"),
                        np.clip(base + rng.integers(-30, 30, (40, 48, 3)), 0, 255).astype(np.uint8))
    return root


def test_pretrain_job_densecl_writes_an_encoder_file_that_fine_tuning_loads(tmp_path: Path):
    """``detkit-pretrain pretrain_job=densecl`` (composed and run in-process): the three losses and the kNN monitor
    are logged, the encoder file says ``densecl``, and ``init=densecl encoder=FILE`` loads it into a detector."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from detkit.cli.pretrain import pretrain
    from detkit.paths import config_dir

    images = _tree(tmp_path / "tree")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("pretrain", overrides=[
            "pretrain_job=densecl", f"data.images={images}", "data.image_size=64", "data.batch_size=3",
            "data.num_workers=0", f"data.knn_train={images}", f"data.knn_val={images}", "trainer.max_epochs=1",
            "+trainer.enable_progress_bar=false", "model.proj_hidden=32", "model.proj_dim=16"])
    encoder = pretrain(cfg, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "pretrain_metrics.json").read_text())
    for key in ("pretrain/loss", "pretrain/loss_global", "pretrain/loss_dense", "pretrain/knn_acc"):
        assert math.isfinite(metrics[key]), key
    blob = torch.load(encoder, map_location="cpu", weights_only=True)
    assert blob["meta"]["method"] == "densecl" and blob["arch"] == {"depth": 18, "small_stem": False}
    assert not any(k.startswith(("projector", "dense_projector")) for k in blob["state_dict"])

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["init=densecl", f"encoder={encoder}", "paths.output_dir=/tmp/x"])
        assert cfg.model.detector.backbone.init == str(encoder)
        module = instantiate(cfg.model, categories=[{"id": 1, "name": "a"}], _recursive_=False)
        loaded = module.detector.backbone.encoder.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in blob["state_dict"].items())
        missing = compose("train", overrides=["init=densecl", "paths.output_dir=/tmp/x"])
    # no file: detkit-train refuses the run before training (tests/cli/test_study.py), never a silent random init
    assert missing.model.detector.backbone.init is None
