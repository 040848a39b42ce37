"""Less common training settings counted and checked right: uneven gradient accumulation with every schedule,
LARS without weight decay, divergence checks between checked steps, anchor k-means on few boxes."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from detkit.lit.divergence import DivergenceMonitor, TrainingDivergedError
from detkit.lit.lars import LARS
from detkit.lit.optim import WarmupSchedule, total_training_steps
from detkit.models.detection.anchor_fit import kmeans_iou


class _Data(L.LightningDataModule):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.data = TensorDataset(torch.randn(n, 4), torch.randn(n, 1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=1)


class _Regression(L.LightningModule):
    """A linear regression whose schedule is sized by :func:`total_training_steps`, recording each step's lr."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.layer, self.kind, self.lrs, self.total = torch.nn.Linear(4, 1), kind, [], None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        self.total = total_training_steps(self.trainer)
        scheduler = WarmupSchedule(self.kind, warmup=0.2).build(optimizer, self.total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_uneven_accumulation_counts_the_steps_lightning_takes():
    """10 batches, accumulate 4, 2 epochs: Lightning steps after batches 4, 8 and the last (10) of each epoch,
    6 steps. Counting 10 // 4 * 2 = 4 made cosine train the last steps at lr 0 and one_cycle step past its end."""
    model = _Regression("cosine")
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, accumulate_grad_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_Data(10))
    assert trainer.global_step == 6 and model.total == 6 and len(model.lrs) == 6
    np.testing.assert_allclose(model.lrs, WarmupSchedule("cosine", warmup=0.2).curve(6, 0.1), rtol=1e-6)
    assert min(model.lrs) > 0  # no step trains at lr 0


@pytest.mark.parametrize("kind", WarmupSchedule.KINDS)
def test_every_schedule_runs_the_counted_steps_without_reaching_its_end_early(kind):
    """Each schedule, sized by the counted steps, is stepped as often as Lightning steps (one_cycle raised
    "Tried to step 5 times" when sized 4) and never trains a step at lr 0."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = WarmupSchedule(kind, warmup=0.2).build(optimizer, 6)
    for _ in range(6):
        assert optimizer.param_groups[0]["lr"] > 0
        optimizer.step()
        scheduler.step()


def test_lars_adapts_weights_without_weight_decay():
    """With weight_decay 0 every weight matrix still gets its trust ratio (adaptation is its own setting); 1-d
    tensors (norms, biases) take plain SGD steps unless their group says ``lars``."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    w.grad, b.grad = torch.full((8, 8), 0.5), torch.full((8,), 0.5)
    w0, b0 = w.detach().clone(), b.detach().clone()
    LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.001).step()
    trust = 0.001 * w0.norm() / w.grad.norm()
    torch.testing.assert_close(w.detach(), w0 - trust * w.grad)
    torch.testing.assert_close(b.detach(), b0 - b.grad)
    v = torch.nn.Parameter(torch.randn(8, 8))
    v.grad = torch.full((8, 8), 0.5)
    v0 = v.detach().clone()
    LARS([{"params": [v], "lars": False}], lr=1.0, momentum=0.0).step()  # explicitly off
    torch.testing.assert_close(v.detach(), v0 - v.grad)


def test_a_non_finite_loss_between_checked_steps_is_caught_before_a_checkpoint():
    monitor = DivergenceMonitor(every=5)
    monitor.record(5, {"loss": torch.tensor(1.0)}, {})
    monitor.record(6, {"loss": torch.tensor(float("nan"))}, {})  # not a checked step
    monitor.record(7, {"loss": torch.tensor(2.0)}, {})
    with pytest.raises(TrainingDivergedError, match="step 6"):
        monitor.flush()  # what on_save_checkpoint calls


def test_a_non_finite_loss_between_checked_steps_is_reported_at_the_next_check():
    monitor = DivergenceMonitor(every=5)
    monitor.record(6, {"loss": torch.tensor(1.0)}, {"nonfinite_proposals": torch.tensor(2)})
    monitor.record(7, {"loss": torch.tensor(float("inf"))}, {"nonfinite_proposals": torch.tensor(0)})
    with pytest.raises(TrainingDivergedError, match="step 6: nonfinite_proposals > 0"):
        monitor.record(10, {"loss": torch.tensor(1.0)}, {"nonfinite_proposals": torch.tensor(0)})


def test_a_finite_run_with_sparse_checks_passes_every_flush():
    monitor = DivergenceMonitor(every=3)
    for step in range(10):
        monitor.record(step, {"loss": torch.tensor(float(step))}, {"nonfinite_proposals": torch.tensor(0)})
    monitor.flush()


def test_kmeans_on_at_most_k_boxes_keeps_their_shapes():
    """Sorting widths and heights separately would invent [10, 15] and [60, 80]."""
    out = kmeans_iou(np.array([[10.0, 80.0], [60.0, 15.0]]), k=3)
    assert out.shape == (3, 2)
    assert {tuple(r) for r in out.tolist()} == {(10.0, 80.0), (60.0, 15.0)}
    assert np.all(np.diff(out.prod(1)) >= 0)  # sorted by area
    assert kmeans_iou(np.zeros((0, 2)), k=2).tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_sampling_draws_differ_across_micro_batches_and_ranks_and_repeat_on_resume():
    """Anchor/RoI sampling is seeded per batch (its number in the run) and rank, not per optimiser step: the
    micro-batches of one accumulation group and the DDP ranks draw differently; the same batch draws the same."""
    from types import SimpleNamespace

    from tests.test_host_sync import build

    module = build("yolo")

    def draw(batch: int, rank: int) -> torch.Tensor:
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=batch))
        module._trainer = SimpleNamespace(fit_loop=loop, global_rank=rank)
        return torch.rand(4, generator=module.sampling_generator(torch.device("cpu")))

    draws = [draw(b, r) for b in range(4) for r in range(2)]  # global_step is the same throughout
    assert len({tuple(d.tolist()) for d in draws}) == 8
    assert torch.equal(draw(2, 1), draw(2, 1))
    module._trainer = None


def test_steps_per_process_under_ddp_follow_the_distributed_sampler():
    """N=12 items, batch 4, 2 processes, drop_last: each process gets ceil(12 / 2) = 6 items, 1 full batch, so 1
    step per epoch (not ceil(floor(12 / 4) / 2) = 2); and max_steps caps an epoch-bound run."""
    from types import SimpleNamespace

    class Loader:
        def __init__(self, n: int, batch: int, drop_last: bool) -> None:
            self.sampler, self.batch_size, self.drop_last = range(n), batch, drop_last

        def __len__(self) -> int:
            return len(self.sampler) // self.batch_size if self.drop_last else -(-len(self.sampler) // self.batch_size)

    def steps(n, batch, world, drop_last=True, epochs=3, max_steps=-1, accumulate=1):
        dm = SimpleNamespace(train_dataloader=lambda: Loader(n, batch, drop_last))
        trainer = SimpleNamespace(max_steps=max_steps, max_epochs=epochs, world_size=world, limit_train_batches=1.0,
                                  accumulate_grad_batches=accumulate)
        return total_training_steps(trainer, dm)

    assert steps(12, 4, 2) == 3 and steps(1000, 64, 8) == 3 and steps(12, 4, 2, drop_last=False) == 6
    assert steps(12, 4, 1) == 9 and steps(10, 1, 1, epochs=2, accumulate=4) == 6
    assert steps(12, 4, 1, max_steps=5) == 5 and steps(12, 4, 1, max_steps=50) == 9
    assert steps(12, 4, 1, epochs=-1, max_steps=7) == 7
