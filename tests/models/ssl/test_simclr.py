"""SimCLR: NT-Xent against the formula written as a loop, the same loss and gradients under 2-process DDP, and
the encoder hand-off to the detectors."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from detkit.models.backbones import Backbone, EncoderLoadError, ResNetEncoder, load_encoder, save_encoder
from detkit.models.ssl.simclr import NTXentLoss


def loop_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The NT-Xent formula, one view at a time."""
    z = torch.cat([z1, z2])
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        sim = [F.cosine_similarity(z[i], z[k], dim=0) / tau for k in range(n2)]
        denom = sum(math.exp(sim[k].item()) for k in range(n2) if k != i)
        total += -(sim[partner].item() - math.log(denom))
    return torch.tensor(total / n2)


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n, d", [(2, 3), (5, 16)])
def test_nt_xent_equals_the_formula(tau, n, d):
    g = torch.Generator().manual_seed(int(tau * 100) + n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    torch.testing.assert_close(NTXentLoss(tau)(z1, z2), loop_nt_xent(z1, z2, tau), rtol=1e-5, atol=1e-5)


def test_nt_xent_is_stable_at_low_temperature_and_rejects_bad_tau():
    z = torch.randn(4, 8) * 100
    assert torch.isfinite(NTXentLoss(0.01)(z, z + 1e-3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NTXentLoss(0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, x1: torch.Tensor, x2: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    proj = torch.nn.Linear(x1.shape[1], 4)
    n = len(x1) // world
    sl = slice(rank * n, (rank + 1) * n)
    loss = NTXentLoss(0.3)(proj(x1[sl]), proj(x2[sl]))
    loss.backward()
    for p in proj.parameters():  # what DDP does to gradients: average over processes
        dist.all_reduce(p.grad)
        p.grad /= world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": [p.grad for p in proj.parameters()]}, out)
    dist.destroy_process_group()


def test_ddp_two_processes_give_the_single_process_loss_and_gradients(tmp_path: Path):
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), x1, x2, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4)
    loss = NTXentLoss(0.3)(proj(x1), proj(x2))
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach())
    for a, b in zip(ddp["grads"], [p.grad for p in proj.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_encoder_file_round_trips_into_the_detection_backbone(tmp_path: Path):
    enc = ResNetEncoder(depth=18)
    with torch.no_grad():
        enc.layer3[0].conv1.weight[0, 0, 0, 0] = 0.123456
        enc.bn1.running_mean[3] = 7.0
    path = save_encoder(enc, tmp_path / "encoder.pt", meta={"method": "simclr"})
    loaded = load_encoder(path)
    assert loaded.layer3[0].conv1.weight[0, 0, 0, 0].item() == pytest.approx(0.123456)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    enc.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), enc(x))
    backbone = Backbone(depth=18, init=str(path))
    assert backbone.encoder.layer3[0].conv1.weight[0, 0, 0, 0].item() == pytest.approx(0.123456)
    assert backbone.encoder.bn1.running_mean[3].item() == 7.0
    for k, v in enc.state_dict().items():
        assert torch.equal(backbone.encoder.state_dict()[k], v), k


def test_encoder_file_that_does_not_fit_is_a_clear_error(tmp_path: Path):
    path = save_encoder(ResNetEncoder(depth=18, small_stem=True), tmp_path / "small.pt")
    with pytest.raises(EncoderLoadError, match="small_stem"):
        Backbone(depth=18, init=str(path))
    blob = torch.load(path, weights_only=True)
    del blob["state_dict"]["layer1.0.conv1.weight"]
    blob["state_dict"]["head.weight"] = torch.zeros(1)
    blob["arch"]["small_stem"] = False
    torch.save(blob, tmp_path / "broken.pt")
    with pytest.raises(EncoderLoadError, match=r"missing keys \['layer1.0.conv1.weight'\].*unexpected keys "
                                               r"\['head.weight'\]"):
        Backbone(depth=18, init=str(tmp_path / "broken.pt"))
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(EncoderLoadError, match="not a detkit encoder file"):
        load_encoder(tmp_path / "other.pt")


def test_the_same_encoder_file_loads_into_both_detectors(tmp_path: Path):
    from hydra.utils import instantiate

    enc = ResNetEncoder(depth=18)
    with torch.no_grad():
        enc.layer4[1].bn2.weight[5] = 3.25
    path = str(save_encoder(enc, tmp_path / "encoder.pt"))
    for model_cfg in ("faster_rcnn", "yolo"):
        from hydra import compose, initialize_config_dir

        from detkit.paths import config_dir

        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[f"model={model_cfg}", f"model.detector.backbone.init={path}",
                                              "paths.output_dir=/tmp/x"])
        module = instantiate(cfg.model, categories=[{"id": 1, "name": "a"}], _recursive_=False)
        loaded = module.detector.backbone.encoder
        assert loaded.layer4[1].bn2.weight[5].item() == 3.25, model_cfg
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in enc.state_dict().items())


def test_pretraining_views_change_from_epoch_to_epoch(tmp_path: Path):
    """Augmentation seeds come from each epoch's base seed, sent by the sampler to the (persistent) workers: were
    they the workers' own seeds, every epoch would repeat the same views (only shuffled). Compare the multiset of
    views across two epochs."""
    from detkit.data.datamodule import PretrainDataModule
    from detkit.data.synthetic import make_synthetic_coco

    _, root = make_synthetic_coco(tmp_path / "d", num_images=6)
    dm = PretrainDataModule(str(root), image_size=32, batch_size=6, num_workers=1, seed=0)
    loader, epochs = dm.train_dataloader(), []  # one loader for the run, as Lightning uses it
    assert loader.persistent_workers
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does before each epoch
        (v1, v2), = list(loader)
        epochs.append([sorted(v.flatten(1).long().sum(1).tolist()) for v in (v1, v2)])
    assert epochs[0][0] != epochs[1][0] and epochs[0][1] != epochs[1][1]  # both views


def test_lars_scales_each_step_by_the_trust_ratio_and_skips_no_decay_groups():
    from detkit.lit.lars import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # a weight matrix, ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))  # a bias (1-d): no adaptation
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1.0, momentum=0.0,
               trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])  # ||g|| = 1
    opt.step()
    trust = 0.01 * 5 / (1 + 0.1 * 5)
    expected = torch.tensor([[3.0, 4.0]]) - trust * (torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), torch.tensor([0.5]))  # plain SGD step: no trust ratio, no decay
    # momentum accumulates the scaled steps like SGD's buffer
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=1.0)
    opt.param_groups[0]["lars"] = True
    before = w.detach().clone()
    for _ in range(2):
        w.grad = w.detach().clone()  # ||g|| = ||w|| -> trust 1
        opt.step()
    step1 = 0.1 * before
    after1 = before - step1
    torch.testing.assert_close(w.detach(), after1 - 0.1 * (after1 + 0.9 * before))


def test_pretraining_runs_with_lars_from_the_config(synthetic, tmp_path: Path):
    from tests.helpers import cli

    ann, root = synthetic
    out = tmp_path / "pre"
    r = cli("detkit-pretrain", f"data.images={root}", "debug=tiny_pretrain",
            "model.optimizer._target_=detkit.lit.lars.LARS", "+model.optimizer.trust_coefficient=0.001",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output[-3000:]
    loss = json.loads((out / "pretrain_metrics.json").read_text())["pretrain/loss"]
    assert math.isfinite(loss) and (out / "encoder.pt").is_file()


def test_pretraining_killed_and_resumed_from_last_checkpoint_equals_an_uninterrupted_run(synthetic, tmp_path: Path):
    """A run killed after its first epoch and restarted with ``+ckpt_path=OUT/checkpoints/last.ckpt`` ends with the
    weights of the uninterrupted run (same seed: same shuffles, views and learning-rate schedule). The run that dies
    by SIGKILL is a process of its own; the others run in-process."""
    import signal
    import subprocess

    from tests.helpers import BIN, ROOT, cli, env_with_path

    ann, root = synthetic  # 8 images, batch 4: 2 steps per epoch; views are reproducible per item in workers only
    args = [f"data.images={root}", "debug=tiny_pretrain", "data.num_workers=1", "trainer.max_epochs=2"]

    r = cli("detkit-pretrain", *args, f"hydra.run.dir={tmp_path / 'full'}")
    assert r.returncode == 0, r.output[-3000:]
    cut = tmp_path / "cut"  # SIGKILL at the start of step 2 (epoch 1), after epoch 0's last.ckpt
    r = subprocess.run([str(BIN / "detkit-pretrain"), *args, f"hydra.run.dir={cut}",
                        "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=2"],
                       capture_output=True, text=True, env=env_with_path(ROOT), timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (cut / "encoder.pt").exists()
    r = cli("detkit-pretrain", *args, f"hydra.run.dir={cut}", f"+ckpt_path={cut / 'checkpoints' / 'last.ckpt'}")
    assert r.returncode == 0, r.output[-3000:]
    full = torch.load(tmp_path / "full/encoder.pt", map_location="cpu", weights_only=True)["state_dict"]
    resumed = torch.load(cut / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in full if not torch.equal(full[k], resumed[k])]
    metrics = json.loads((cut / "pretrain_metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["epochs_this_run"] == 1


def test_projector_ends_with_batch_norm_like_simclrs_code_and_lightlys_head():
    from detkit.models.ssl.simclr import Projector

    proj = Projector(64, 32, 16).train()
    assert isinstance(proj.net[-1], torch.nn.BatchNorm1d) and proj.net[-2].bias is None
    z = proj(torch.randn(256, 64) * 5 + 3)
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-4, rtol=0)  # standardised per dimension
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(16), atol=1e-2, rtol=0)
    assert isinstance(Projector(64, 32, 16, out_bn=False).net[-1], torch.nn.Linear)


def test_pretraining_continues_from_an_encoder_file(tmp_path: Path):
    """``detkit-pretrain model.init=FILE``: the encoder starts from the file (all weights and BN statistics), the
    projector fresh; a file of another architecture is a clear error; the option is in the pretraining config."""
    from hydra import compose, initialize_config_dir

    from detkit.lit.pretrain_module import SimCLRModule
    from detkit.paths import config_dir

    torch.manual_seed(0)
    source = ResNetEncoder(depth=18, small_stem=True)
    with torch.no_grad():
        source.layer3[0].bn1.running_mean.fill_(0.75)
    path = save_encoder(source, tmp_path / "encoder.pt")
    module = SimCLRModule(small_stem=True, proj_hidden=32, proj_dim=16, init=str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(module.encoder.state_dict()[k], v), k
    assert module.hparams.init == str(path)
    with pytest.raises(EncoderLoadError):
        SimCLRModule(small_stem=False, proj_hidden=32, proj_dim=16, init=str(path))
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"model.init={path}"])
    assert cfg.model.init == str(path)
