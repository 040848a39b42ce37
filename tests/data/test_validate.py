"""detkit-data-check and the pre-training validation: one broken COCO file per problem, each reported with the
right id, kind and exit code."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from detkit.cli.data_check import main as data_check
from detkit.data.coco import CocoDetection
from detkit.data.validate import DatasetError, validate_coco
from tests.helpers import dump, load


def _broken(synthetic, tmp_path: Path, edit) -> tuple[Path, Path]:
    ann, root = synthetic
    data = copy.deepcopy(load(ann))
    edit(data, root)
    return dump(data, tmp_path / "broken.json"), root


def _first_ann(data: dict) -> dict:
    return data["annotations"][0]


CASES = {
    "image_missing_keys": (lambda d, r: d["images"][1].pop("file_name"), "image id 1"),
    "annotation_missing_keys": (lambda d, r: _first_ann(d).pop("bbox"), "annotation id 0"),
    "duplicate_image_id": (lambda d, r: d["images"][2].update(id=1), "image id 1"),
    "duplicate_annotation_id": (lambda d, r: d["annotations"][1].update(id=0), "annotation id 0"),
    "unknown_image": (lambda d, r: _first_ann(d).update(image_id=999), "annotation id 0 (image id 999)"),
    "unknown_category": (lambda d, r: _first_ann(d).update(category_id=77), "annotation id 0"),
    "bbox_nonpositive": (lambda d, r: _first_ann(d).update(bbox=[5, 5, 0, 10]), "annotation id 0"),
    "bbox_outside_image": (lambda d, r: _first_ann(d).update(bbox=[100, 50, 60, 10]), "annotation id 0"),
    "bbox_malformed": (lambda d, r: _first_ann(d).update(bbox=[1, 2, "x", 4]), "annotation id 0"),
    "image_file_missing": (lambda d, r: d["images"][1].update(file_name="nope.png"), "image id 1"),
    "image_size_mismatch": (lambda d, r: d["images"][1].update(width=130), "image id 1"),
    "unsafe_file_name": (lambda d, r: d["images"][1].update(file_name="../../etc/passwd"), "image id 1"),
    "duplicate_category_id": (lambda d, r: d["categories"].append({"id": 0, "name": "dup"}), "category id 0"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_problem_is_reported_with_its_id_and_exit_1(synthetic, tmp_path, capsys, kind):
    edit, where = CASES[kind]
    ann, root = _broken(synthetic, tmp_path, edit)
    assert data_check([str(ann), str(root)]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if f"[{kind}]" in ln]
    assert lines, f"no line reports {kind}"
    assert lines[0].startswith(where), lines[0]


def test_absolute_file_name_is_refused_and_never_opened(synthetic, tmp_path, capsys):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not even an image")
    ann, root = _broken(synthetic, tmp_path, lambda d, r: d["images"][3].update(file_name=str(outside)))
    assert data_check([str(ann), str(root)]) == 1
    out = capsys.readouterr().out
    assert "image id 3: file_name" in out and "absolute path" in out and "[unsafe_file_name]" in out


def test_symlink_leading_outside_the_root_is_refused(synthetic, tmp_path, capsys):
    ann, root = synthetic
    (tmp_path / "secret.png").write_bytes((root / "img_0001.png").read_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    ann, root = _broken(synthetic, tmp_path, lambda d, r: d["images"][1].update(file_name="link.png"))
    assert data_check([str(ann), str(root)]) == 1
    assert "escapes the image root" in capsys.readouterr().out


def test_corrupt_image_bytes_are_reported(synthetic, tmp_path, capsys):
    ann, root = synthetic
    good = (root / "img_0002.png").read_bytes()
    (root / "img_0002.png").write_bytes(good[: len(good) // 2])  # truncated file: header fine, pixels missing
    (root / "img_0005.png").write_bytes(b"\x89PNG garbage")
    assert data_check([str(ann), str(root)]) == 1
    out = capsys.readouterr().out
    assert "image id 2: " in out and "image id 5: " in out
    assert out.count("[image_file_unreadable]") == 2


def test_clean_dataset_exits_0(synthetic, capsys):
    ann, root = synthetic
    assert data_check([str(ann), str(root)]) == 0
    assert "OK (8 images" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid json"),
    ("[1, 2, 3]", "not a COCO file"),
    ('{"images": [], "annotations": []}', "no top-level 'categories'"),
])
def test_unusable_input_exits_2(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert data_check([str(bad), str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_training_refuses_a_broken_dataset_with_the_report(synthetic, tmp_path):
    ann, root = _broken(synthetic, tmp_path, lambda d, r: _first_ann(d).update(bbox=[5, 5, -3, 10]))
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    assert "annotation id 0 (image id" in str(err.value) and "bbox_nonpositive" in str(err.value)


def test_skip_invalid_drops_and_says_how_many(synthetic, tmp_path, caplog):
    def edit(d, r):
        d["annotations"][-1].update(bbox=[5, 5, -3, 10])  # on the last image
        d["images"][1]["file_name"] = "missing.png"  # drops image 1 with its annotations

    ann, root = _broken(synthetic, tmp_path, edit)
    data = load(ann)
    assert data["annotations"][-1]["image_id"] != 1
    on_image_1 = sum(a["image_id"] == 1 for a in data["annotations"])
    with caplog.at_level("WARNING"):
        ds = CocoDetection(ann, root, skip_invalid=True)
    assert len(ds) == len(data["images"]) - 1
    assert sum(len(r.labels) for r in ds.records) == len(data["annotations"]) - on_image_1 - 1
    assert f"skipped 1 image(s) and {on_image_1 + 1} annotation(s)" in caplog.text
    assert "bbox_nonpositive: 1" in caplog.text and "image_file_missing: 1" in caplog.text


def test_embedded_bccd_splits_are_clean():
    from tests.helpers import BCCD

    for split in ("train", "val", "test"):
        report = validate_coco(BCCD / "annotations" / f"{split}.json", BCCD / "images")
        assert report.ok, report.format()
