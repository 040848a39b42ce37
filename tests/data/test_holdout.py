"""Settings chosen on the training split (issue 29: "a backbone learning-rate multiplier and warm-up chosen on the
train split, never on val"): ``data.holdout_fraction`` sets training images aside, never trains on them, and
validates and scores on them instead of val."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import numpy as np

from detkit.data.coco import HOLDOUT_SEED_OFFSET, split_holdout
from detkit.data.datamodule import DetectionDataModule
from detkit.data.synthetic import make_synthetic_coco
from tests.helpers import TINY_FRCNN, cli, data_args, load


def _coco(n: int) -> dict:
    return {"images": [{"id": 100 + i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(n)],
            "annotations": [{"id": 1000 + i, "image_id": 100 + i // 2, "bbox": [0, 0, 2, 2], "category_id": 1}
                            for i in range(2 * n)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_split_holdout_partitions_the_images_and_their_annotations():
    data = _coco(20)
    rest, held = split_holdout(data, 0.25, seed=3)
    held_ids, rest_ids = {im["id"] for im in held["images"]}, {im["id"] for im in rest["images"]}
    assert len(held_ids) == 5 and len(rest_ids) == 15 and not held_ids & rest_ids
    assert held_ids | rest_ids == {im["id"] for im in data["images"]}
    for part, ids in ((held, held_ids), (rest, rest_ids)):
        assert {a["image_id"] for a in part["annotations"]} == ids  # every image's two boxes go with it
        assert len(part["annotations"]) == 2 * len(ids)
        assert part["categories"] == data["categories"]
    assert split_holdout(data, 0.25, seed=3) == (rest, held)  # a function of the seed
    assert {im["id"] for im in split_holdout(data, 0.25, seed=4)[1]["images"]} != held_ids
    assert held_ids != {100, 101, 102, 103, 104}  # drawn at random, not the head of the file


@pytest.mark.parametrize("seed", range(10))
def test_entries_naming_the_same_file_fall_on_the_same_side(tmp_path: Path, seed: int):
    """A picture listed under two ids (a merged export; ``./a.jpg`` and ``a.jpg`` are one file) must not be trained
    on and scored at once."""
    data = _coco(24)
    for i, im in enumerate(data["images"]):  # 8 files, each listed three times, spelled three ways
        im["file_name"] = [f"f{i % 8}.jpg", f"./f{i % 8}.jpg", f"sub/../f{i % 8}.jpg"][i // 8]
    rest, held = split_holdout(data, 0.25, seed=seed, image_root=tmp_path)
    file_of = lambda im: im["file_name"].split("/")[-1]  # noqa: E731
    held_files, rest_files = {file_of(im) for im in held["images"]}, {file_of(im) for im in rest["images"]}
    assert held_files and rest_files and not held_files & rest_files
    assert len(held["images"]) == 6 and len(rest["images"]) == 18  # two whole files of three entries each
    assert len(held["annotations"]) == 12


def test_without_repeated_files_the_holdout_is_a_plain_random_subset(tmp_path: Path):
    data = _coco(20)
    by_name = split_holdout(data, 0.25, seed=3)
    assert split_holdout(data, 0.25, seed=3, image_root=tmp_path) == by_name  # the image root changes nothing
    drawn = np.random.default_rng(3 + HOLDOUT_SEED_OFFSET).permutation(20)[:5]  # the draw before files were grouped
    assert {im["id"] for im in by_name[1]["images"]} == {100 + int(i) for i in drawn}


def test_a_file_that_would_leave_nothing_to_train_on_is_skipped_by_the_draw(tmp_path: Path):
    data = _coco(4)
    for i, im in enumerate(data["images"]):  # two files of two entries; 3 of 4 to hold out
        im["file_name"] = "a.jpg" if i < 2 else "b.jpg"
    for seed in range(6):  # whichever file is drawn first, the second would empty the training side
        rest, held = split_holdout(data, 0.75, seed=seed, image_root=tmp_path)
        assert len(held["images"]) == len(rest["images"]) == 2
        assert len({im["file_name"] for im in held["images"]}) == 1
    data["images"][2]["file_name"] = data["images"][3]["file_name"] = "a.jpg"  # one file only: no split
    with pytest.raises(ValueError, match="1 distinct files"):
        split_holdout(data, 0.25, seed=0, image_root=tmp_path)


@pytest.mark.parametrize("fraction, n", [(0.01, 20), (0.99, 20), (0.5, 1), (0.0, 20), (1.0, 20)])
def test_a_holdout_that_leaves_a_part_empty_is_refused_with_the_file_named(fraction: float, n: int):
    with pytest.raises(ValueError, match="train.json"):
        split_holdout(_coco(n), fraction, seed=0, source="data/x/train.json")


def test_the_data_module_trains_on_the_rest_and_validates_on_the_held_out_images(tmp_path: Path):
    ann, root = make_synthetic_coco(tmp_path / "d", num_images=20, first_id=0, empty_every=0)
    ids = lambda ds: {r.image_id for r in ds.records}  # noqa: E731
    dm = DetectionDataModule(str(ann), str(root), val_ann=str(tmp_path / "never_read.json"), val_images=str(root),
                             image_size=64, holdout_fraction=0.2, check_images=False)
    dm.setup("fit")
    train, val = ids(dm.datasets["train"]), ids(dm.datasets["val"])
    assert len(val) == 4 and len(train) == 16 and not train & val
    assert dm.datasets["val"].transform is dm.eval_transform
    assert dm.paths["val"] == (str(ann), str(root))  # the report's images are the held-out ones
    # the label budget is drawn from the images left: still disjoint from the holdout, which does not change
    small = DetectionDataModule(str(ann), str(root), image_size=64, holdout_fraction=0.2, train_fraction=0.5,
                                check_images=False)
    small.setup("fit")
    assert len(ids(small.datasets["train"])) == 8 and not ids(small.datasets["train"]) & val
    assert ids(small.datasets["val"]) == val
    plain = DetectionDataModule(str(ann), str(root), val_ann=str(ann), val_images=str(root), image_size=64,
                                check_images=False)
    plain.setup("fit")
    assert ids(plain.datasets["train"]) == ids(plain.datasets["val"]) == train | val


def test_detkit_train_scores_the_holdout_and_says_so(synthetic_set, tmp_path: Path):
    ann, root = synthetic_set
    out = tmp_path / "run"
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, "trainer.max_epochs=1", "data.holdout_fraction=0.25",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output[-3000:]
    metrics = load(out / "metrics.json")
    assert metrics["evaluated_on"] == "holdout"
    predicted = {p["image_id"] for p in load(out / "predictions.json")}
    held = {im["id"] for im in split_holdout(load(ann), 0.25, seed=0)[1]["images"]}
    assert predicted and predicted <= held  # only the 2 held-out images were scored
    assert {im["id"] for im in load(out / "holdout_ground_truth.json")["images"]} == held
    # detkit-report rebuilds the page against the held-out images, not the run's data.val_ann (all 8 images)
    shutil.rmtree(out / "report")
    (out / "report.html").unlink()
    r = cli("detkit-report", str(out))
    assert r.returncode == 0, r.output
    assert {int(p.stem) for p in (out / "report").rglob("*.jpg")} == held
    # detkit-eval: without data.val_ann it says how to score the held-out images; so told, it gives the run's AP
    ckpt = load(out / "run.json")["checkpoint"]
    r = cli("detkit-eval", f"checkpoint={ckpt}", "device=cpu", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'e0'}")
    assert r.returncode != 0 and f"data.val_images={root}" in r.output, r.output[-2000:]
    assert f"data.val_ann={out.resolve() / 'holdout_ground_truth.json'}" in r.output
    r = cli("detkit-eval", f"checkpoint={ckpt}", "device=cpu", "data.num_workers=0",
            f"data.val_ann={out / 'holdout_ground_truth.json'}", f"data.val_images={root}",
            f"hydra.run.dir={tmp_path / 'e1'}")
    assert r.returncode == 0, r.output[-2000:]
    assert load(tmp_path / "e1" / "metrics.json")["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    key = lambda p: (p["image_id"], p["category_id"], round(p["score"], 4))  # noqa: E731
    again = sorted(map(key, load(tmp_path / "e1" / "predictions.json")))
    before = sorted(map(key, load(out / "predictions.json")))
    assert again and again == before  # the same model on the same held-out images


def test_self_training_never_uses_the_held_out_images(tmp_path: Path):
    from detkit.data.weak_strong import UnlabeledPairs, WeakStrongViews

    ann, root = make_synthetic_coco(tmp_path / "u", num_images=6, first_id=0, empty_every=0)
    files = sorted(root.glob("*.png"))
    views = WeakStrongViews(size=32)
    pool = UnlabeledPairs(root, views, exclude=[files[1], root / ".." / root.name / files[4].name])
    assert len(pool) == 4 and {Path(f).resolve() for f in pool.files} == {f.resolve() for f in files} - {
        files[1].resolve(), files[4].resolve()}
    labeled = UnlabeledPairs(root, views, ann_file=ann, exclude=[files[1]])
    assert len(labeled) == 5 and files[1].resolve() not in {Path(f).resolve() for f in labeled.files}
    assert len(labeled.boxes) == len(labeled.labels) == len(labeled.image_ids) == 5
    excluded_id = next(im["id"] for im in load(ann)["images"] if im["file_name"] == files[1].name)
    assert excluded_id not in labeled.image_ids
    with pytest.raises(FileNotFoundError, match="excluded"):
        UnlabeledPairs(root, views, exclude=files)


def test_the_study_refuses_a_holdout(tmp_path: Path):
    from detkit.cli.study import main

    for sweep in ("data.holdout_fraction=0.2", "data.holdout_fraction=0,0.2"):
        with pytest.raises(SystemExit, match="holdout would leak"):
            main(["--out", str(tmp_path / "s"), "--", sweep])
    assert not (tmp_path / "s" / "unlabeled").exists()  # refused before any pool was written


def test_detkit_train_keeps_the_held_out_images_out_of_the_self_training_pool(tmp_path: Path):
    from hydra.utils import instantiate

    from detkit.cli.train import add_unlabeled_images
    from tests.helpers import TINY, compose_train

    ann, root = make_synthetic_coco(tmp_path / "d", num_images=8, first_id=0, empty_every=0)
    cfg = compose_train((ann, root), "data.holdout_fraction=0.25", "semi=teacher", f"semi.unlabeled_images={root}",
                        fast=TINY)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    add_unlabeled_images(cfg, dm)
    held = {r.path.resolve() for r in dm.datasets["val"].records}
    pool = {Path(f).resolve() for f in dm.unlabeled.files}
    assert len(held) == 2 and not pool & held
    assert pool == {f.resolve() for f in root.glob("*.png")} - held  # the training images stay in the pool


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_the_automatic_image_size_ignores_the_held_out_images_and_not_the_label_budget(tmp_path: Path, budget: float):
    """``data.image_size: null`` measures the training split's boxes without the held-out ones (they are for choosing
    settings, so they must decide nothing), and before the label budget (every budget of a study trains at one
    size)."""
    from detkit.cli.train import build_datamodule
    from detkit.data.box_stats import MIN_SIZE, choose_image_size
    from tests.helpers import compose_train, dump

    ann, root = make_synthetic_coco(tmp_path / "d", num_images=12, size=(640, 480), first_id=1)
    data = load(ann)
    held = {im["id"] for im in split_holdout(data, 0.25, seed=0)[1]["images"]}
    for a in data["annotations"]:  # the held-out images hold tiny objects, the others small ones
        a["bbox"] = [10, 10, 3, 3] if a["image_id"] in held else [10, 10, 14, 14]
    dump(data, ann)
    rest = split_holdout(data, 0.25, seed=0)[0]
    assert choose_image_size(data) == 640 and choose_image_size(rest) == 384 != MIN_SIZE  # not the provisional size

    cfg = compose_train((ann, root), "data.image_size=null", "data.holdout_fraction=0.25", "data.num_workers=0",
                        "data.check_images=false", f"data.train_fraction={budget}")
    dm = build_datamodule(cfg)
    assert cfg.data.image_size == 384
    assert {r.image_id for r in dm.datasets["val"].records} == held
    assert len(dm.datasets["train"]) == round(9 * budget)
    for split in ("train", "val"):  # the splits built before the size was known now transform to it
        assert dm.datasets[split].transform.size == 384
    for split in ("train", "val"):
        image, _ = dm.datasets[split][0]
        assert max(image.shape[1:]) == 384
