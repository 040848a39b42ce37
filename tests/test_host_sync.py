"""The GPU hot path stays free of host synchronisations, checked on a CPU: every data-dependent op (nonzero,
.item(), boolean-mask indexing, unique, tensors built from Python data ...) in one training step and one
prediction of each detector is counted by a TorchDispatchMode, with the device-side settings a GPU run uses
(cluster NMS, the gather RoIAlign)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from detkit.structures import Targets
from detkit.host_sync import HostSyncCounter
from detkit.paths import config_dir

GPU_PATH = {"faster_rcnn": ["model.detector.rpn.nms=cluster", "model.detector.roi_heads.inference.nms=cluster",
                            "model.detector.roi_heads.pooler.impl=gather", "model.ema_decay=0.999"],
            "yolo": ["model.detector.inference.nms=cluster"]}


def build(model: str, *overrides: str, **kwargs):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", *GPU_PATH[model],
                                          "model.detector.backbone.neck_channels=32", *overrides])
    torch.manual_seed(0)
    if cfg.semi.enabled:
        kwargs.update(_target_="detkit.lit.semi.SelfTrainingModule", semi=cfg.semi)
    return instantiate(cfg.model, categories=[{"id": i, "name": str(i)} for i in range(3)], _recursive_=False,
                       **kwargs)


def batch() -> tuple[torch.Tensor, Targets]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 192, 256), dtype=torch.uint8, generator=g)
    targets = Targets.from_list([
        {"boxes": torch.tensor([[10.0, 20, 100, 120], [50, 50, 90, 70], [3, 3, 7, 8]]), "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    return images, targets


def targets_with(n: int) -> Targets:
    """``n`` random boxes (3 classes) in the first image of :func:`batch`'s size, none in the second."""
    g = torch.Generator().manual_seed(n)
    xy, wh = torch.rand(n, 2, generator=g) * 150, torch.rand(n, 2, generator=g) * 60 + 8
    return Targets.from_list([{"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.arange(n) % 3},
                              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])


@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_a_training_step_has_no_host_synchronisation(model):
    module = build(model)
    opt = torch.optim.SGD(module.detector.parameters(), lr=0.01, momentum=0.9)
    images, targets = batch()
    for step in range(2):  # the first step fills the caches (anchors, cell grids, lookup tables)
        with HostSyncCounter() as sync:
            generator = module.sampling_generator(images.device)
            losses = module.detector.loss(images, targets, generator=generator)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            if module.ema is not None:
                module.ema.update(module.detector)
    assert torch.isfinite(total)
    assert sync.total == 0, (dict(sync.counts), dict(sync.sites))


@pytest.mark.parametrize("model, adaptive", [("faster_rcnn", False), ("faster_rcnn", True),
                                             ("faster_rcnn", "soft_background"), ("yolo", False),
                                             ("yolo", True), ("yolo", "dense"), ("yolo", "dense_per_class")],
                         ids=["faster_rcnn-fixed_threshold", "faster_rcnn-adaptive_threshold",
                              "faster_rcnn-soft_background", "yolo-fixed_threshold",
                              "yolo-adaptive_threshold", "yolo-dense", "yolo-dense_per_class"])
def test_a_self_training_step_has_no_host_synchronisation(model, adaptive):
    """The semi-supervised step (semi=teacher after burn-in: the teacher's prediction on the weak views with its
    fixed-iteration NMS, pseudo-labels by top-k and mask, the student's supervised and unsupervised losses, the
    pseudo-labels matched against the unlabeled images' labels, backward, optimiser step, teacher update) is as
    free of host synchronisations as the supervised one. Threshold 0: the untrained teacher's detections are kept,
    so the pseudo-labels hold real boxes (YOLO's initial scores, 1e-4, are below its inference threshold)."""
    from detkit.data.weak_strong import UnlabeledBatch

    low = ["model.detector.inference.score_thresh=0.0"] if model == "yolo" else []
    mode = {"dense": ["semi.pseudo_labels=dense"],
            "dense_per_class": ["semi.pseudo_labels=dense", "semi.dense_per_class=true"],
            "soft_background": ["semi.soft_background=true"]}.get(
        adaptive, [f"semi.adaptive_threshold={str(adaptive).lower()}", "semi.adaptive_floor=0.0"])
    module = build(model, "semi=teacher", "semi.unlabeled_images=unused", "semi.unlabeled_ann=unused.json",
                   "semi.burn_in=0", "semi.score_threshold=0.0", "semi.max_pseudo_labels=16", *low, *mode)
    opt = torch.optim.SGD(module.detector.parameters(), lr=0.01, momentum=0.9)
    labeled = batch()
    images, targets = batch()
    unlabeled = UnlabeledBatch(images.flip(-1), images.flip(-1).roll(1, 1), targets)
    for step in range(2):  # the first step fills the caches
        with HostSyncCounter() as sync:
            losses, _ = module.training_losses({"labeled": labeled, "unlabeled": unlabeled})
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            module.update_teacher(step)
    assert {k for k in losses if k.startswith("unsup_")} == {f"unsup_{k}" for k in module.unsup_losses}
    assert torch.isfinite(total) and int(module._stats[:, 0].sum()) > 0  # pseudo-labels were used
    assert (module._confidence is not None) == (adaptive is True)  # the class levels moved on the device
    assert sync.total == 0, (dict(sync.counts), dict(sync.sites))


@pytest.mark.parametrize("model, budget", [("faster_rcnn", 2), ("yolo", 1)])
def test_prediction_reads_back_only_the_nms_convergence_flags(model, budget):
    """Inference runs greedy NMS exactly: Cluster-NMS reads one boolean per 4 iterations to stop; nothing else."""
    module = build(model).eval()
    images, _ = batch()
    with torch.no_grad():
        module.detector.predict(images)
        with HostSyncCounter() as sync:
            dets = module.detector.predict(images)
    assert dets.boxes.shape == (2, 100, 4)
    assert set(sync.counts) <= {"equal"} and sync.total <= 2 * budget, dict(sync.counts)


def test_the_counter_sees_what_stalls_a_gpu():
    x = torch.arange(6.0)
    with HostSyncCounter() as sync:
        x[x > 2]
        x.nonzero()
        float(x.sum())
        torch.tensor([1.0, 2.0])
        x.repeat_interleave(torch.tensor([1, 1, 1, 1, 1, 2]))
        torch.where(x > 2, x, 0.0).topk(2)  # fixed-shape: not counted
    assert dict(sync.counts) == {"bool_mask_index": 1, "nonzero": 1, "item": 1, "tensor_from_host_data": 2,
                                 "repeat_interleave": 1}


def test_the_counter_sees_synchronisations_inside_backward_formulas():
    """``prod``'s backward reads ``(input == 0).sum().item()``: a sync on a GPU that a TorchDispatchMode-based
    counter never saw (autograd takes its subclass branch under a mode). This hid YOLO's 2 syncs per CUDA step."""
    x = torch.rand(5, 2, requires_grad=True)
    with HostSyncCounter() as sync:
        x.prod(-1).sum().backward()
    assert dict(sync.counts) == {"item": 1}
    assert any("ProdBackward" in site for site in sync.sites), dict(sync.sites)


@pytest.mark.parametrize("kind", ["giou", "ciou"])
def test_iou_losses_and_their_backward_are_sync_free(kind):
    from detkit.models.detection.boxes import batched_box_iou
    from detkit.models.detection.losses import iou_loss

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 16, 2, generator=g) * 50
    pred = torch.cat([xy, xy + torch.rand(4, 16, 2, generator=g) * 30], -1).requires_grad_()
    target = pred.detach() + torch.randn(4, 16, 4, generator=g)
    with HostSyncCounter() as sync:
        (iou_loss(pred, target, kind).sum() + batched_box_iou(pred, target).sum()).backward()
    assert sync.total == 0, (dict(sync.counts), dict(sync.sites))


def test_a_simclr_step_has_no_host_synchronisation():
    from detkit.lit.pretrain_module import SimCLRModule

    torch.manual_seed(0)
    module = SimCLRModule(small_stem=True, proj_hidden=64, proj_dim=32)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    views = torch.rand(2, 8, 3, 32, 32)
    for _ in range(2):
        with HostSyncCounter() as sync:
            z = module.projector(module.encoder(torch.cat([views[0], views[1]])))
            loss = module.criterion(*z.chunk(2))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert sync.total == 0, (dict(sync.counts), dict(sync.sites))


@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_the_training_loss_compiles_as_one_graph_once(model):
    """``model.compile`` gets the whole loss (forward, sampling, losses) as one graph, which CUDA graphs
    (``compile=reduce-overhead``) need; a graph break (a torch.Generator argument, a data-dependent shape, a
    host read) would split it and ``fullgraph=True`` raises with its reason. It compiles once per image shape:
    shape-constant tensors (anchors, cell grids, lookup tables) are built inside the graph when compiling
    (:mod:`detkit.models.detection.shape_cache`); cached in a dict by the first compiled call, they would fail the
    dict's guards and compile the whole step again (minutes for Faster R-CNN on a GPU). Traced by dynamo with its
    eager backend (no code generation)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    detector = build(model).detector
    images, targets = batch()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(detector.loss, backend=counter, fullgraph=True)
    compiled(images, targets)  # (dynamo sees the forward; autograd then differentiates the graph's ops)
    detector.loss(images, targets)  # an eager call fills the caches; the compiled step still does not recompile
    compiled(images, targets)
    assert counter.frame_count == 1
    # Batches pad their boxes to a multiple of 8, so the box count G varies: the second G compiles once more,
    # with G symbolic (dynamo's automatic dynamic shapes), and every later G reuses that graph.
    for n in (11, 19):
        compiled(images, targets_with(n))
    assert counter.frame_count == 2
