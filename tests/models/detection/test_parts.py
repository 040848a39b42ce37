"""Detector parts as specifications: hand-computed cases, and equivalence with torchvision on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, box_iou, nms, roi_align

from detkit.models.detection.anchors import AnchorGenerator, anchors_per_location
from detkit.models.detection.box_coder import BoxCoder
from detkit.models.detection.boxes import batched_box_iou
from detkit.models.detection.matcher import Matcher
from detkit.host_sync import HostSyncCounter
from detkit.models.detection.postprocess import batched_multiclass_nms, cluster_nms
from detkit.models.detection.roi_align import roi_align_gather
from detkit.models.detection.roi_heads import RoIPooler
from detkit.models.detection.sampler import BalancedSampler


def random_boxes(n: int, size: float = 200.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---- anchors -------------------------------------------------------------------------------------------------
def test_classic_nine_anchors_per_location_hand_computed():
    gen = AnchorGenerator(sizes=[[128, 256, 512]], aspect_ratios=[[0.5, 1.0, 2.0]])
    assert gen.num_anchors_per_location() == [9]
    base = gen.base_anchors([128], [1.0, 2.0])
    # ratio 1: a 128x128 square centred at 0; ratio 2 (h/w): w = 128/sqrt2 = 90.5, h = 181.0
    assert base.tolist() == [[-64, -64, 64, 64], [-45, -91, 45, 91]]
    anchors = gen([torch.zeros(1, 8, 2, 3)], image_size=(32, 48))[0]
    assert anchors.shape == (2 * 3 * 9, 4)
    # location (row 1, col 2) at stride 16: shift (32, 16); its first anchor is ratio 0.5, size 128
    assert anchors[(1 * 3 + 2) * 9].tolist() == (gen.base_anchors([128], [0.5])[0] + torch.tensor([32, 16, 32, 16])).tolist()


@pytest.mark.parametrize("image_size", [(320, 320), (256, 384)])
def test_anchors_equal_torchvision(image_size):
    sizes = ((16, 32), (64, 96), (128, 192))
    ratios = ((0.5, 1.0, 2.0),) * 3
    feats = [torch.zeros(2, 4, image_size[0] // s, image_size[1] // s) for s in (8, 16, 32)]
    ours = torch.cat(AnchorGenerator(sizes, ratios)(feats, image_size))
    tv = TVAnchorGenerator(sizes, ratios)(ImageList(torch.zeros(2, 3, *image_size), [image_size] * 2), feats)
    assert torch.equal(ours, tv[0]) and torch.equal(ours, tv[1])


def test_anchor_level_mismatch_is_a_clear_error():
    gen = AnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[1.0], [1.0]])
    with pytest.raises(ValueError, match="2 level.*gives 3 feature map"):
        gen([torch.zeros(1, 1, 4, 4)] * 3, (32, 32))
    with pytest.raises(ValueError, match="same number of anchors per location"):
        anchors_per_location([[32], [64, 128]], [[1.0], [1.0]])


# ---- box coder -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_equals_torchvision_and_round_trips(weights):
    boxes, ref = random_boxes(500, seed=1), random_boxes(500, seed=2)
    ours, tv = BoxCoder(weights), tv_utils.BoxCoder(weights)
    deltas = ours.encode(boxes, ref)
    torch.testing.assert_close(deltas, tv.encode_single(boxes, ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(deltas, ref), boxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours.decode(deltas, ref), tv.decode_single(deltas, ref), rtol=1e-5, atol=1e-4)


def test_box_coder_hand_computed_and_clamped():
    coder = BoxCoder((1, 1, 1, 1), scale_clamp=math.log(4))
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    box = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20) vs (5, 10); size 20x20 vs 10x20
    torch.testing.assert_close(coder.encode(box, ref), torch.tensor([[1.0, 0.5, math.log(2), 0.0]]))
    huge = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), ref)  # exp clamped at 4x
    torch.testing.assert_close(huge, torch.tensor([[-15.0, -30.0, 25.0, 50.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_under_autocast_is_float32_and_exact(dtype):
    """Under mixed precision the head's deltas arrive in half precision; boxes must still be decoded in float32
    (a box near x=600 decoded in bf16 is off by up to 4 px)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.tensor([[580.3, 590.7, 620.9, 640.2]]).repeat(200, 1) + torch.rand(200, 4, generator=g) * 30
    head = torch.nn.Linear(4, 4)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    with torch.autocast("cpu", dtype=dtype):
        deltas = head(torch.randn(200, 4, generator=g))
        assert deltas.dtype == dtype  # the situation the decode must cope with
        boxes = coder.decode(deltas, ref)
        targets = coder.encode(boxes, ref)
        iou = batched_box_iou(boxes[None], ref[None])
    assert boxes.dtype == targets.dtype == iou.dtype == torch.float32
    torch.testing.assert_close(boxes, coder.decode(deltas.float(), ref), atol=1e-3, rtol=0)
    torch.testing.assert_close(iou[0], box_iou(boxes, ref), atol=1e-6, rtol=0)


def test_degenerate_boxes_encode_finite():
    coder = BoxCoder((10, 10, 5, 5))
    deltas = coder.encode(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert torch.isfinite(deltas).all()


# ---- IoU, matcher, sampler -----------------------------------------------------------------------------------
def test_batched_iou_equals_box_iou():
    a, b = random_boxes(30, seed=3).view(3, 10, 4), random_boxes(60, seed=4).view(3, 20, 4)
    ours = batched_box_iou(a, b)
    for i in range(3):
        torch.testing.assert_close(ours[i], box_iou(a[i], b[i]))


@pytest.mark.parametrize("high, low, lowq", [(0.7, 0.3, True), (0.5, 0.5, False), (0.6, 0.4, False)])
def test_matcher_equals_torchvision(high, low, lowq):
    gt, anchors = random_boxes(12, seed=5), random_boxes(400, seed=6)
    iou = box_iou(gt, anchors)
    ours = Matcher(high, low, lowq)(iou[None], torch.ones(1, 12, dtype=torch.bool))[0]
    tv = tv_utils.Matcher(high, low, lowq)(iou)
    assert torch.equal(ours, tv)


def test_matcher_handles_padding_and_empty_images():
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, False], [False, False]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0]])
    m = Matcher(0.7, 0.3, True)(batched_box_iou(gt, anchors[None]), valid)  # IoUs 1.0, 0.5, 0.0
    assert m.tolist() == [[0, Matcher.IGNORE, Matcher.BACKGROUND], [Matcher.BACKGROUND] * 3]


def test_matcher_low_quality_match_keeps_best_anchor():
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 50.0, 50.0]])  # IoU 0.25 and 0
    m = Matcher(0.7, 0.3, True)(batched_box_iou(gt, anchors[None]), torch.ones(1, 1, dtype=torch.bool))
    assert m.tolist() == [[0, -1]]


def test_sampler_draws_a_fixed_number_positives_first_within_budget():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(4, 1000, generator=g) < 0.2
    neg = ~pos
    pos[3] = False  # an image without positives gets only negatives
    neg[2, 100:] = False  # an image with too few candidates: 64 positives + its few negatives, the rest invalid
    neg[2] &= ~pos[2]
    s = BalancedSampler(256, 0.25)(pos, neg, generator=g)
    assert s.index.shape == s.positive.shape == s.valid.shape == (4, 256)
    chosen_pos = pos.gather(1, s.index) & s.valid
    chosen_neg = neg.gather(1, s.index) & s.valid
    assert torch.equal(s.positive, chosen_pos) and torch.equal(s.valid, chosen_pos | chosen_neg)
    assert s.positive.sum(1).tolist() == [64, 64, 64, 0]
    assert s.valid.sum(1).tolist() == [256, 256, 64 + int(neg[2].sum()), 256]
    # positives come first, and no candidate is sampled twice
    assert all(bool(p[: int(p.sum())].all()) for p in s.positive)
    assert all(len(set(row[v].tolist())) == int(v.sum()) for row, v in zip(s.index, s.valid))


def test_sampler_draws_uniformly_and_reproducibly():
    pos = torch.zeros(1, 100, dtype=torch.bool)
    pos[0, :10] = True
    counts = torch.zeros(100)
    for seed in range(400):
        s = BalancedSampler(8, 0.25)(pos, ~pos, generator=torch.Generator().manual_seed(seed))
        counts[s.index[0][s.valid[0]]] += 1
    assert counts[:10].sum() == 2 * 400 and counts[10:].sum() == 6 * 400
    assert counts[:10].min() > 40 and counts[10:].min() > 10  # every candidate drawn (expected 80 and ~27)
    a = BalancedSampler(8, 0.25)(pos, ~pos, generator=torch.Generator().manual_seed(3))
    b = BalancedSampler(8, 0.25)(pos, ~pos, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- post-processing -----------------------------------------------------------------------------------------
def _reference_loop(boxes, scores, labels, valid, thresh, max_det):
    out = []
    for b in range(len(boxes)):
        idx = valid[b].nonzero(as_tuple=True)[0]
        keep = batched_nms(boxes[b, idx], scores[b, idx], labels[b, idx], thresh)[:max_det]
        out.append((boxes[b, idx][keep], scores[b, idx][keep], labels[b, idx][keep]))
    return out


def _nms_case(seed: int, b: int = 5, n: int = 300, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(b * n, seed=seed + 1).view(b, n, 4)
    scores = torch.rand(b, n, generator=g)
    labels = torch.randint(0, classes, (b, n), generator=g)
    valid = scores > 0.2
    if b > 2:
        valid[2] = False  # an image with no candidates
    return boxes, scores, labels, valid


@pytest.mark.parametrize("strategy", ["torchvision", "cluster"])
@pytest.mark.parametrize("seed, thresh", [(7, 0.5), (11, 0.3), (13, 0.7)])
def test_batched_nms_equals_per_image_torchvision_loop(strategy, seed, thresh):
    boxes, scores, labels, valid = _nms_case(seed)
    dets = batched_multiclass_nms(boxes, scores, labels, valid, thresh, 40, strategy=strategy)
    assert dets.boxes.shape == (5, 40, 4)
    for (rb, rs, rl), d in zip(_reference_loop(boxes, scores, labels, valid, thresh, 40), dets.to_list()):
        assert torch.equal(d["boxes"], rb) and torch.equal(d["scores"], rs) and torch.equal(d["labels"], rl)
    assert dets.valid[2].sum() == 0


@pytest.mark.parametrize("seed", range(5))
def test_cluster_nms_is_greedy_nms_on_dense_overlapping_boxes(seed):
    """Crowded scenes (many boxes around a few centres) make the longest suppression chains."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * 200
    xy = centres[torch.randint(0, 6, (800,), generator=g)] + torch.randn(800, 2, generator=g) * 6
    wh = 20 + torch.rand(800, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], 1)[None]
    scores = torch.rand(1, 800, generator=g)
    order = scores[0].argsort(descending=True)
    keep = cluster_nms(boxes[:, order], torch.ones(1, 800, dtype=torch.bool), None, 0.5)
    assert torch.equal(order[keep[0]], nms(boxes[0], scores[0], 0.5))


def test_cluster_nms_converges_in_few_iterations_and_inexact_mode_never_reads_back():
    boxes, scores, labels, valid = _nms_case(3, b=1, n=1000)
    order = scores[0].argsort(descending=True)
    b, v, lab = boxes[:, order], valid[:, order], labels[:, order]
    exact = cluster_nms(b, v, lab, 0.5)
    with HostSyncCounter() as sync:
        fixed = cluster_nms(b, v, lab, 0.5, exact=False, iterations=4)
    assert sync.total == 0 and torch.equal(fixed, exact)


def _chain(n: int) -> torch.Tensor:
    """``n`` 32 px boxes 8 px apart: IoU 0.6 with the next, 1/3 with the one after (greedy NMS at 0.5, in this
    order, keeps every other box)."""
    return torch.tensor([[8.0 * i, 0.0, 8.0 * i + 32, 32.0] for i in range(n)])


def _depths(boxes: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, thresh: float) -> torch.Tensor:
    """Per score-sorted candidate, the longest suppression chain ending at it (0: nothing before it suppresses it)."""
    sup = (box_iou(boxes, boxes) > thresh) & (labels[:, None] == labels[None, :]) & valid[:, None]
    depth = torch.zeros(len(boxes), dtype=torch.int64)
    for j in range(len(boxes)):
        above = sup[:j, j]
        depth[j] = depth[:j][above].max() + 1 if above.any() else 0
    return depth


@pytest.mark.parametrize("t", range(1, 25))
def test_fixed_iteration_cluster_nms_on_a_chain_is_greedy_up_to_depth_t(t):
    """A chain of 24 boxes: ``t`` iterations decide the first ``t + 1`` boxes as greedy NMS does, are exact only from
    ``t = 23``, keep a superset of greedy's boxes for an even ``t`` and a subset for an odd one."""
    greedy = torch.arange(24) % 2 == 0
    keep = cluster_nms(_chain(24)[None], torch.ones(1, 24, dtype=torch.bool), None, 0.5, exact=False,
                       iterations=t)[0]
    assert torch.equal(keep[:t + 1], greedy[:t + 1])
    assert torch.equal(keep, greedy) == (t >= 23)
    if t % 2 == 0:
        assert not (greedy & ~keep).any()
    else:
        assert not (keep & ~greedy).any()
    assert int(keep.sum()) == {4: 22, 16: 16}.get(t, int(keep.sum()))  # the figures in cluster_nms's docstring
    assert torch.equal(cluster_nms(_chain(24)[None], torch.ones(1, 24, dtype=torch.bool), None, 0.5)[0], greedy)


@pytest.mark.parametrize("seed", range(3))
def test_fixed_iteration_cluster_nms_agrees_with_greedy_exactly_on_candidates_of_depth_at_most_t(seed):
    """The bound of cluster_nms's docstring on crowded, multi-class, partly invalid boxes: after ``t`` iterations
    every candidate of depth <= t is decided as greedy NMS decides it, deeper ones err only upwards (even t) or
    downwards (odd t), and the whole result is greedy NMS's when no candidate is deeper than t."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(4, 2, generator=g) * 100
    xy = centres[torch.randint(0, 4, (300,), generator=g)] + torch.randn(300, 2, generator=g) * 5
    boxes = torch.cat([xy, xy + 20 + torch.rand(300, 2, generator=g) * 20], 1)
    labels = torch.randint(0, 2, (300,), generator=g)
    valid = torch.rand(300, generator=g) > 0.1
    greedy = cluster_nms(boxes[None], valid[None], labels[None], 0.5)[0]
    depth = _depths(boxes, valid, labels, 0.5)
    assert depth[valid].max() >= 4  # deep enough for the small t to be inexact
    for t in range(1, int(depth[valid].max()) + 2):
        keep = cluster_nms(boxes[None], valid[None], labels[None], 0.5, exact=False, iterations=t)[0]
        shallow = depth <= t
        assert torch.equal(keep[shallow], greedy[shallow])
        assert not ((greedy & ~keep) if t % 2 == 0 else (keep & ~greedy)).any()
        if depth[valid].max() <= t:
            assert torch.equal(keep, greedy)


def _chain_rpn(nms: str, nms_iterations: int | None = 4):
    from detkit.models.detection.anchors import AnchorGenerator
    from detkit.models.detection.rpn import RegionProposalNetwork

    return RegionProposalNetwork(1, AnchorGenerator([[32]], [[1.0]]), pre_nms_top_n={"test": 24},
                                 post_nms_top_n={"test": 30}, nms_thresh=0.5, nms=nms,
                                 nms_iterations=nms_iterations).eval()


@pytest.mark.parametrize("n", [5, 6, 24])
def test_rpn_cluster_proposals_on_a_chain_contain_the_cpu_paths_and_are_exact_with_nms_iterations_none(n):
    """The RPN's cluster path (the GPU default, 4 iterations) against the CPU path (torchvision's greedy NMS) on a
    chain of ``n`` anchors: the same proposals up to 5 boxes (depth 4), a superset beyond (24: 22 against 12);
    ``nms_iterations=None`` gives the CPU path's proposals."""
    anchors = _chain(n)
    logits = torch.linspace(3, 1, n)[None]
    deltas = torch.zeros(1, n, 4)

    def proposed(rpn) -> set:
        p = rpn.propose([anchors], [logits], [deltas], (256, 256))
        return {tuple(b) for b in p.boxes[0][p.valid[0]].tolist()}

    greedy = proposed(_chain_rpn("torchvision"))
    assert len(greedy) == (n + 1) // 2
    fixed = proposed(_chain_rpn("cluster"))
    assert greedy <= fixed and (fixed == greedy) == (n <= 5)
    assert len(fixed) == {24: 22}.get(n, len(fixed))
    assert proposed(_chain_rpn("cluster", None)) == greedy


@pytest.mark.parametrize("nms_strategy", ["torchvision", "cluster"])
def test_roi_postprocess_equals_torchvision(nms_strategy):
    """Same proposals, logits and deltas -> the same detections as torchvision's RoIHeads.postprocess_detections
    (torchvision puts background at index 0 and predicts deltas for it too; detkit puts it last)."""
    from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads

    from detkit.models.detection.postprocess import PostProcess
    from detkit.models.detection.roi_heads import RoIHeads
    from detkit.structures import Proposals, Targets

    g = torch.Generator().manual_seed(9)
    c, image_size = 4, (240, 320)
    proposals = [random_boxes(n, size=220, seed=10 + n) for n in (50, 0, 80)]
    padded = Targets.from_list([{"boxes": p, "labels": torch.zeros(len(p), dtype=torch.int64)} for p in proposals])
    props = Proposals(padded.boxes, padded.valid, torch.zeros(()))
    k = props.boxes.shape[1]
    logits = torch.randn(3, k, c + 1, generator=g) * 3
    deltas = torch.randn(3, k, c, 4, generator=g) * 0.5
    ours = RoIHeads(8, [8], c, inference=PostProcess(topk_candidates=10**6, nms=nms_strategy))
    dets = ours.postprocess_detections(logits, deltas, props, image_size).to_list()
    tv = TVRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100)
    tv_logits = torch.cat([logits[..., c:], logits[..., :c]], dim=-1)[padded.valid]
    tv_deltas = torch.cat([torch.zeros(3, k, 4), deltas.flatten(2)], dim=-1)[padded.valid]
    tv_boxes, tv_scores, tv_labels = tv.postprocess_detections(tv_logits, tv_deltas, proposals, [image_size] * 3)
    for d, b, s, lab in zip(dets, tv_boxes, tv_scores, tv_labels):
        torch.testing.assert_close(d["boxes"], b)
        torch.testing.assert_close(d["scores"], s)
        assert torch.equal(d["labels"] + 1, lab)


@pytest.mark.parametrize("kind", ["giou", "ciou"])
def test_iou_losses_equal_torchvision(kind):
    from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

    from detkit.models.detection.losses import iou_loss

    a, b = random_boxes(400, seed=20), random_boxes(400, seed=21)
    reference = (generalized_box_iou_loss if kind == "giou" else complete_box_iou_loss)(a, b)
    torch.testing.assert_close(iou_loss(a, b, kind), reference, atol=1e-6, rtol=1e-5)
    padding = torch.zeros(3, 4)  # zero-size padding pairs: finite, so a mask can remove them
    assert torch.isfinite(iou_loss(padding, padding, kind)).all()


def _random_rois(n: int, batch: int, width: float, height: float, generator: torch.Generator) -> torch.Tensor:
    """Boxes that also cross and leave the image (RoIAlign's edge rules matter there), some degenerate."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([width, height]) * 1.1 - 10
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([width, height]) * 0.5
    wh[:3] = 0.0  # zero-size boxes
    idx = torch.randint(0, batch, (n, 1), generator=generator).to(torch.float64)
    return torch.cat([idx, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_gather_equals_torchvision_values_and_gradients(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(sampling_ratio)
    feats = torch.randn(3, 5, 13, 17, dtype=torch.float64, generator=g, requires_grad=True)
    rois = _random_rois(40, 3, 17 * 8, 13 * 8, g)
    ref = roi_align(feats, rois, 7, 1 / 8, sampling_ratio, aligned)
    out = roi_align_gather(feats, rois, 7, 1 / 8, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(out, feats, grad)[0], torch.autograd.grad(ref, feats, grad)[0])
    assert roi_align_gather(feats, rois[:0], 7, 1 / 8, sampling_ratio, aligned).shape == (0, 5, 7, 7)


def test_roi_pooler_gather_equals_the_torchvision_kernel_over_fpn_levels():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 40 // 2**i, 48 // 2**i, generator=g, requires_grad=True) for i in range(3)]
    boxes = _random_rois(60, 2, 384, 320, g)[:, 1:].float().view(2, 30, 4)  # 30 RoIs per image
    outs, grads = [], []
    for impl in ("torchvision", "gather"):
        out = RoIPooler([8, 16, 32], impl=impl)(feats, boxes)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), feats))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert RoIPooler([8]).use_gather and not RoIPooler([8], impl="torchvision").use_gather
    with pytest.raises(ValueError, match="fixed sampling_ratio"):
        RoIPooler([8], sampling_ratio=0, impl="gather")


@pytest.mark.parametrize("impl", ["gather", "torchvision"])
def test_pooler_and_level_assignment_survive_nan_inf_and_empty_boxes(impl):
    """A diverged RPN decodes to NaN/inf boxes: the FPN level of a NaN box used to become int64's minimum and index
    out of bounds. Every such box must pool finite values from a valid level."""
    feats = [torch.randn(2, 4, 40 // 2**i, 48 // 2**i) for i in range(3)]
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor([[[nan, nan, nan, nan], [0.0, 0.0, inf, inf], [-inf, -inf, 10.0, 10.0]],
                          [[5.0, 5.0, 5.0, 5.0], [1e30, 1e30, 2e30, 2e30], [10.0, 10.0, 90.0, 60.0]]])
    pooler = RoIPooler([8, 16, 32], impl=impl)
    levels = pooler.assign_levels(boxes)
    assert ((levels >= 0) & (levels < 3)).all()
    out = pooler(feats, boxes)
    assert out.shape == (6, 4, 7, 7) and torch.isfinite(out).all()
    rois = torch.cat([torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0], [1.0]]), boxes.view(6, 4)], 1)
    assert torch.isfinite(roi_align_gather(feats, rois, 7, [1 / 8, 1 / 16, 1 / 32], 2, True,
                                           levels=pooler.assign_levels(rois[:, 1:]))).all()
