"""ONNX export: onnxruntime gives the same detections as detkit's predict on real BCCD val images, the file passes
onnx.checker, and a file that is not a detkit detector is refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install 'detkit[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'detkit[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install 'detkit[export]'")

from detkit.data.coco import read_rgb  # noqa: E402
from detkit.data.transforms import LetterboxImage  # noqa: E402
from tests.helpers import BCCD  # noqa: E402
from tests.helpers import TINY as TINY_RUN, TINY_FRCNN, cli, run  # noqa: E402
from tests.helpers import compose_train, fit_steps  # noqa: E402

SIZE = 160


def bccd_val_batch(n: int) -> torch.Tensor:
    val = json.loads((BCCD / "annotations" / "val.json").read_text())
    letterbox = LetterboxImage(SIZE)
    boxed = [letterbox(read_rgb(BCCD / "images" / im["file_name"]))[0] for im in val["images"][:n]]
    return torch.stack([torch.from_numpy(b.transpose(2, 0, 1).copy()) for b in boxed])  # uint8 [n, 3, S, S]


def assert_same_detections(ours, theirs) -> int:
    """Same detections per image (boxes within 1e-2 px, scores within 1e-4 relative, same labels), whatever their
    order among equal scores."""
    boxes, scores, labels, valid = (t.numpy() for t in ours)
    o_boxes, o_scores, o_labels, o_count = theirs
    for i in range(len(boxes)):
        n = int(valid[i].sum())
        assert int(o_count[i]) == n, (i, n, int(o_count[i]))
        ob, os_, ol = o_boxes[i, :n], o_scores[i, :n], o_labels[i, :n]
        for b, s, c in zip(boxes[i, :n], scores[i, :n], labels[i, :n]):
            close = (np.abs(ob - b).max(1) < 1e-2) & (np.abs(os_ - s) <= 1e-4 * max(float(s), 1e-6)) & (ol == c)
            assert close.any(), f"image {i}: detection {b} {s} {c} missing from onnxruntime's output"
    return int(valid.sum())


@pytest.mark.slow  # about 50 s each: a short training, an export in a subprocess and two comparisons
@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_onnxruntime_matches_predict_on_real_images(synthetic, tmp_path, model):
    cfg = compose_train(synthetic, f"model={model}", f"data.image_size={SIZE}",
                        # YOLO's scores start at its prior, 0.01 x 0.01 = 1e-4, below the evaluation threshold (0.001),
                        # and 4 steps at this rate do not lift them over it: keep every candidate.
                        *([] if model == "faster_rcnn" else ["model.ema_decay=null", "model.optimizer.lr=0.002",
                                                             "model.detector.inference.score_thresh=1e-6"]),
                        fast=TINY_FRCNN if model == "faster_rcnn" else TINY_RUN)
    module, trainer = fit_steps(cfg, steps=4)  # a few steps: scores spread out from their initial values
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "export"
    r = run(["detkit-export", f"checkpoint={ckpt}", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stdout + r.stderr
    onnx.checker.check_model(str(out / "model.onnx"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["image_size"] == SIZE and [c["id"] for c in meta["categories"]] == [0, 1, 2]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    module.eval()
    for n in (1, 4):
        images = bccd_val_batch(n)
        with torch.no_grad():
            ours = module.inference_model.predict(images)
        assert assert_same_detections(ours, session.run(None, {"images": images.numpy()})) > 0


def test_a_file_that_is_not_a_detector_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, bogus)
    r = cli("detkit-export", f"checkpoint={bogus}", f"hydra.run.dir={tmp_path / 'x'}")
    text = r.output
    assert r.returncode == 1 and "Traceback" not in text, text
    assert "is not a detkit detector checkpoint" in text


# ---- exact NMS in the graph: hand-built candidates through a tiny detector, in the default suite -------------------
# The tiny detectors read their candidates from the image pixels, so one exported graph takes any hand-built case:
# column j of the image is candidate j, with its box (x1, y1, x2, y2 in pixels) in rows 0-3 of channel 0, its score
# x 255 in row 0 of channel 1 and its class in row 0 of channel 2.
TINY, TINY_CLASSES, TINY_MAX_DET = 64, 2, 20
CHAIN = [[8.0 * i, 0.0, 8.0 * i + 32, 32.0] for i in range(24)]  # IoU 0.6 with the next, 1/3 with the one after


def encode(candidates: list[tuple[list[float], int, int]]) -> torch.Tensor:
    """``[(box, score 0-255, class), ...]`` -> ``uint8 [3, TINY, TINY]``."""
    image = torch.zeros(3, TINY, TINY, dtype=torch.uint8)
    for j, (box, score, label) in enumerate(candidates):
        image[0, :4, j] = torch.tensor(box, dtype=torch.uint8)
        image[1, 0, j], image[2, 0, j] = score, label
    return image


class PixelCandidates(torch.nn.Module):
    """A detector whose candidates are written in its input image (see :func:`encode`), post-processed by detkit's
    :class:`PostProcess` (NMS 0.5, at most ``TINY_MAX_DET`` detections)."""

    def __init__(self) -> None:
        from detkit.models.detection.postprocess import PostProcess

        super().__init__()
        self.inference = PostProcess(score_thresh=0.05, nms_thresh=0.5, topk_candidates=TINY * TINY_CLASSES,
                                     detections_per_img=TINY_MAX_DET)

    def predict(self, images: torch.Tensor):
        x = images.float()
        boxes = x[:, 0, :4].transpose(1, 2)  # [B, TINY, 4]
        labels = x[:, 2, 0].long()
        one_hot = (labels[..., None] == torch.arange(TINY_CLASSES)).float()
        return self.inference(boxes, x[:, 1, 0, :, None] / 255 * one_hot)


class ChainProposals(torch.nn.Module):
    """A detector that returns the RPN's proposals of the anchors :data:`CHAIN` (zero deltas) with the objectness
    logits written in row 0 of channel 1 of its image (NMS 0.7 as the RPN's default would not suppress along the
    chain: 0.5 here)."""

    def __init__(self) -> None:
        from detkit.models.detection.anchors import AnchorGenerator
        from detkit.models.detection.rpn import RegionProposalNetwork

        super().__init__()
        n = len(CHAIN)
        self.rpn = RegionProposalNetwork(1, AnchorGenerator([[32]], [[1.0]]), pre_nms_top_n={"test": n},
                                         post_nms_top_n={"test": n + 6}, nms_thresh=0.5)
        self.register_buffer("anchors", torch.tensor(CHAIN))

    def predict(self, images: torch.Tensor):
        from detkit.structures import Detections

        logits = images[:, 1, 0, :len(CHAIN)].float() / 10
        props = self.rpn.propose([self.anchors], [logits], [torch.zeros(*logits.shape, 4)], (256, 256))
        return Detections(props.boxes, props.valid.float(), torch.zeros_like(props.valid, dtype=torch.int64),
                          props.valid)


class _AsDetectionModule:
    """What :func:`export_onnx` reads from a ``DetectionModule``."""

    def __init__(self, detector: torch.nn.Module) -> None:
        from types import SimpleNamespace

        self.inference_model, self.hparams = detector.eval(), {"image_size": TINY}
        self.categories = SimpleNamespace(to_list=lambda: [{"id": c, "name": str(c)} for c in range(TINY_CLASSES)])


@pytest.fixture(scope="module")
def tiny_sessions(tmp_path_factory):
    from detkit.export import export_onnx

    out = tmp_path_factory.mktemp("tiny_export")
    sessions = {}
    for name, detector in (("pixels", PixelCandidates()), ("rpn", ChainProposals())):
        path = export_onnx(_AsDetectionModule(detector), out / f"{name}.onnx")
        sessions[name] = (detector, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    return sessions


def run_both(session, detector, images: torch.Tensor):
    with torch.no_grad():
        ours = detector.predict(images)
    theirs = session.run(None, {"images": images.numpy()})
    assert_same_detections(ours, theirs)
    return ours, theirs


CASES = {
    # greedy NMS keeps every other box of the chain: 12; 16 Cluster-NMS iterations kept 16
    "chain": ([(box, 250 - i, 0) for i, box in enumerate(CHAIN)], 12),
    # nothing scores above the threshold (10/255 < 0.05)
    "no_detection": ([(box, 10, 0) for box in CHAIN], 0),
    # 40 disjoint boxes: the 20 best-scoring ones
    "over_the_cap": ([([12.0 * (j % 5), 12.0 * (j // 5), 12.0 * (j % 5) + 8, 12.0 * (j // 5) + 8], 250 - 5 * j, 0)
                      for j in range(40)], TINY_MAX_DET),
    # the chain in both classes: 12 per class, class-aware, then capped at 20 (boxes 0, 2, ..., 18 of each)
    "chain_two_classes": ([(box, 250 - 2 * i, 0) for i, box in enumerate(CHAIN)]
                          + [(box, 249 - 2 * i, 1) for i, box in enumerate(CHAIN)], TINY_MAX_DET),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_keeps_what_predict_keeps_on_hand_built_candidates(tiny_sessions, case):
    detector, session = tiny_sessions["pixels"]
    candidates, expected = CASES[case]
    ours, (boxes, _, labels, count) = run_both(session, detector, encode(candidates)[None])
    assert int(ours.valid.sum()) == expected == int(count[0])
    if case.startswith("chain"):  # greedy NMS along the chain: every other box, from the first
        kept = {(int(c), int(b[0]) // 8) for b, c in zip(boxes[0, :int(count[0])], labels[0, :int(count[0])])}
        assert kept == {(c, i) for c in range(1 + case.endswith("classes")) for i in range(0, 24, 2)
                        if i < 20 or case == "chain"}


def test_onnxruntime_keeps_what_predict_keeps_on_a_batch_of_cases(tiny_sessions):
    detector, session = tiny_sessions["pixels"]
    images = torch.stack([encode(candidates) for candidates, _ in CASES.values()])
    ours, (_, _, _, count) = run_both(session, detector, images)
    assert count.tolist() == [expected for _, expected in CASES.values()] == ours.valid.sum(1).tolist()


def test_onnxruntime_rpn_proposals_are_greedy_nms_along_a_chain(tiny_sessions):
    """The exported RPN suppresses as the CPU path (torchvision's greedy NMS) does, scores in either direction."""
    detector, session = tiny_sessions["rpn"]
    down = encode([(box, 250 - i, 0) for i, box in enumerate(CHAIN)])
    up = encode([(box, 10 + i, 0) for i, box in enumerate(CHAIN)])
    ours, (boxes, _, _, count) = run_both(session, detector, torch.stack([down, up]))
    assert count.tolist() == [12, 12] == ours.valid.sum(1).tolist()
    assert sorted(int(b[0]) // 8 for b in boxes[0, :12]) == list(range(0, 24, 2))
    assert sorted(int(b[0]) // 8 for b in boxes[1, :12]) == list(range(1, 24, 2))
