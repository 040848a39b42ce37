"""Folders of images as users hand them over (issue 35): unreadable files are named and skipped before any work,
or refused with ``skip_invalid=false``; a file that breaks during a run is skipped with a warning; every reader
decodes the stored pixels (EXIF orientation ignored) as RGB uint8 whatever the file's pixel format."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detkit.data.image_files import ImageFolderError, check_image_folder, read_rgb
from tests.helpers import load

SIZE = (60, 40)  # (width, height) of the generated photos


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts with an empty check cache of its own."""
    monkeypatch.setenv("DETKIT_CACHE_DIR", str(tmp_path / "cache"))


def photo(path: Path, seed: int = 0, size: tuple[int, int] = SIZE) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    photo(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def messy_folder(root: Path, good: int = 3) -> Path:
    """``good`` photos, a ``.jpg`` that is not an image, a truncated JPEG and a text file."""
    for i in range(good):
        photo(root / f"good_{i}.png", seed=i)
    (root / "broken.jpg").write_bytes(b"this is not an image")
    truncated_jpeg(root / "truncated.jpg")
    (root / "notes.txt").write_text("not an image either")
    return root


# ---- one reading policy, every pixel format ------------------------------------------------------------------

def pixel_formats(root: Path) -> dict[str, np.ndarray]:
    """A small file of each awkward pixel format -> the RGB uint8 pixels it must load as."""
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    rgb = np.stack([x * 4, y * 6, 255 - x * 2], axis=2).astype(np.uint8)  # smooth: survives the JPEG thumbnails
    rgb[10:30, 20:40] = (250, 20, 120)
    gray = rgb[..., 1]
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    Image.fromarray(gray).save(root / "gray.png")
    expected["gray.png"] = np.repeat(gray[..., None], 3, axis=2)
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 90, np.uint8)])).save(root / "rgba.png")
    expected["rgba.png"] = rgb
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
    palette.save(root / "palette.png")
    expected["palette.png"] = np.asarray(palette.convert("RGB"))
    Image.fromarray(gray).convert("LA").save(root / "gray_alpha.png")
    expected["gray_alpha.png"] = np.repeat(gray[..., None], 3, axis=2)
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "gray16.png")
    expected["gray16.png"] = np.repeat(gray[..., None], 3, axis=2)
    cv2.imwrite(str(root / "rgb16.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    expected["rgb16.png"] = rgb
    return expected


def test_every_pixel_format_loads_as_rgb_uint8_in_every_reader(tmp_path):
    from detkit.cli.predict import ImageFiles, draw
    from detkit.data.device_views import SourceImage
    from detkit.data.unlabeled import UnlabeledImages
    from detkit.eval.html_report import _thumbnail

    expected = pixel_formats(tmp_path / "formats")
    checked = check_image_folder(tmp_path / "formats")
    assert sorted(p.name for p in checked.files) == sorted(expected) and not checked.skipped
    unlabeled = UnlabeledImages(tmp_path / "formats", SourceImage(SIZE[0]))
    predict = ImageFiles(checked.files, SIZE[0])
    for i, path in enumerate(checked.files):
        want = expected[path.name]
        image = read_rgb(path)
        assert image.dtype == np.uint8 and image.shape == (SIZE[1], SIZE[0], 3), path.name
        np.testing.assert_array_equal(image, want, err_msg=path.name)
        letterboxed, valid = unlabeled[i]  # source images for device views: (uint8 [3, S, S], valid w/h)
        assert letterboxed.dtype == torch.uint8 and valid.tolist() == [SIZE[0], SIZE[1]]
        np.testing.assert_array_equal(letterboxed[:, :SIZE[1], :].permute(1, 2, 0).numpy(), want)
        boxed, meta = predict[i]
        assert boxed.dtype == torch.uint8 and meta["orig_size"].tolist() == [SIZE[1], SIZE[0]]
        out = tmp_path / "drawn" / f"{path.stem}.jpg"
        out.parent.mkdir(exist_ok=True)
        draw(path, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                    "scores": torch.zeros(0)}, [], out)
        assert read_rgb(out).shape == (SIZE[1], SIZE[0], 3)
        assert _thumbnail(path, tmp_path / "thumbs" / f"{path.stem}.jpg") == SIZE
        thumb = read_rgb(tmp_path / "thumbs" / f"{path.stem}.jpg")
        assert thumb.shape == (SIZE[1], SIZE[0], 3)
        assert np.abs(thumb.astype(int) - want).mean() < 20, path.name  # JPEG-compressed, same pixels


def exif_rotated_photo(path: Path) -> tuple[list[float], np.ndarray]:
    """A 60x40 photo (stored pixels) with a white block, saved with EXIF orientation 6 ("rotate 90 degrees
    clockwise to display"); returns the block's box (xywh, stored pixels) and the stored pixels."""
    image = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    image[5:15, 40:55] = 255  # top right in the stored pixels
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path, exif=exif, quality=95)
    return [40.0, 5.0, 15.0, 10.0], image


def test_exif_orientation_is_ignored_by_every_reader_so_boxes_land_on_the_object(tmp_path):
    """COCO boxes are in the stored pixels; the report's thumbnail and predict's drawing must show those pixels,
    not the EXIF-rotated ones, or the boxes land beside the objects."""
    from detkit.cli.predict import draw
    from detkit.eval.html_report import build_report

    root = tmp_path / "images"
    box, stored = exif_rotated_photo(root / "rotated.jpg")
    assert cv2.imread(str(root / "rotated.jpg"), cv2.IMREAD_COLOR).shape[:2] == (SIZE[0], SIZE[1])  # it IS tagged
    np.testing.assert_allclose(read_rgb(root / "rotated.jpg"), stored, atol=30)
    gt = {"images": [{"id": 1, "file_name": "rotated.jpg", "width": SIZE[0], "height": SIZE[1]}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 150, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "block"}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9}]
    out = tmp_path / "run"
    out.mkdir()
    page = build_report(out, gt, results, root, {"AP": 1.0}).read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    shown = data["images"][0]
    assert (shown["w"], shown["h"]) == SIZE
    thumb = read_rgb(out / shown["thumb"])
    assert thumb.shape[:2] == (SIZE[1], SIZE[0])
    x, y, w, h = (int(v) for v in box)
    assert thumb[y + 2:y + h - 2, x + 2:x + w - 2].mean() > 200  # the drawn box (page coordinates) is on the block
    assert thumb[25:35, 5:20].mean() < 50
    drawn = tmp_path / "drawn.jpg"
    draw(root / "rotated.jpg", {"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
                                "labels": torch.tensor([0]), "scores": torch.tensor([0.9])}, ["block"], drawn)
    drawn_px = read_rgb(drawn)
    assert drawn_px.shape[:2] == (SIZE[1], SIZE[0])
    assert drawn_px[y + 3:y + h - 3, x + 3:x + w - 3].mean() > 200  # inside the drawn box: the block


# ---- the check before any work ---------------------------------------------------------------------------------

def test_unreadable_files_are_named_with_the_reason_and_skipped_and_other_files_are_not_opened(tmp_path,
                                                                                              monkeypatch, caplog):
    root = messy_folder(tmp_path / "in")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp).name) or real_open(fp, *a, **k))
    with caplog.at_level(logging.WARNING):
        checked = check_image_folder(root)
    assert [p.name for p in checked.files] == ["good_0.png", "good_1.png", "good_2.png"]
    reasons = dict(checked.skipped)
    assert set(reasons) == {"broken.jpg", "truncated.jpg"}
    assert "cannot identify" in reasons["broken.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert checked.ignored == 1 and "notes.txt" not in opened
    summary = checked.summary()
    assert summary["images"] == 3 and summary["skipped"] == 2 and summary["ignored_non_image_files"] == 1
    assert {s["file"] for s in summary["skipped_files"]} == {"broken.jpg", "truncated.jpg"}
    text = caplog.text
    assert text.count("'broken.jpg'") == 1 and text.count("'truncated.jpg'") == 1 and "skipped 2" in text

    with pytest.raises(ImageFolderError) as err:
        check_image_folder(root, skip_invalid=False)
    message = str(err.value)
    assert "'broken.jpg'" in message and "'truncated.jpg'" in message and "skip_invalid" in message


def test_an_empty_folder_or_one_where_nothing_decodes_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as err:
        check_image_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value) and "\n" not in str(err.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"nope")
    truncated_jpeg(broken / "b.jpg")
    for skip in (True, False):
        with pytest.raises(ImageFolderError) as err:
            check_image_folder(broken, skip_invalid=skip)
        assert str(broken) in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert "none of the 2 image files" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_image_folder(tmp_path / "nope")


def test_the_check_is_cached_per_folder_and_a_changed_file_is_checked_again(tmp_path, monkeypatch):
    import detkit.data.image_files as image_files

    root = messy_folder(tmp_path / "in")
    probed = []
    real_probe = image_files._probe
    monkeypatch.setattr(image_files, "_probe", lambda p: probed.append(p.name) or real_probe(p))
    first = check_image_folder(root)
    assert sorted(probed) == ["broken.jpg", "good_0.png", "good_1.png", "good_2.png", "truncated.jpg"]
    probed.clear()
    again = check_image_folder(root)
    assert probed == [] and again.files == first.files and again.skipped == first.skipped
    photo(root / "broken.jpg", seed=7)  # replaced by a good image: checked again, now readable
    os.utime(root / "broken.jpg", ns=(1, 1))
    third = check_image_folder(root)
    assert probed == ["broken.jpg"] and "broken.jpg" in [p.name for p in third.files]


def test_a_passing_failure_is_not_cached_and_a_same_size_same_mtime_replacement_is_checked(tmp_path, monkeypatch):
    """A permission or I/O error says nothing lasting about a file: the next run checks it again. A file replaced
    by one of the same size and modification time (cp -p, rsync -a) is a new inode: checked again."""
    from PIL import Image

    import detkit.data.image_files as image_files

    root = messy_folder(tmp_path / "in")
    real_open = Image.open

    def deny(path, *a, **kw):
        if Path(path).name == "good_1.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(image_files.Image, "open", deny)
    first = check_image_folder(root)
    assert "good_1.png" in [name for name, _ in first.skipped]
    monkeypatch.setattr(image_files.Image, "open", real_open)  # the cause fixed: size and mtime unchanged
    assert "good_1.png" in [p.name for p in check_image_folder(root).files]
    good = root / "good_2.png"
    st = good.stat()
    replacement = tmp_path / "same_size.png"
    replacement.write_bytes(b"\0" * st.st_size)  # not an image, same size
    os.replace(replacement, good)
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "good_2.png" in [name for name, _ in check_image_folder(root).skipped]


def test_a_file_the_runs_reader_cannot_decode_does_not_pass_the_check(tmp_path):
    """A 32-bit float TIFF decodes in Pillow but not in the reader training uses: refused by the check, not in a
    loader worker."""
    from PIL import Image

    root = tmp_path / "in"
    root.mkdir()
    photo(root / "good.png", seed=1)
    Image.fromarray(np.random.default_rng(0).random((16, 16), dtype=np.float32), mode="F").save(root / "float.tif")
    check = check_image_folder(root)
    assert [p.name for p in check.files] == ["good.png"]
    assert dict(check.skipped)["float.tif"].startswith("32-bit float samples")


def test_names_leading_out_of_the_folder_are_never_opened(tmp_path):
    outside = photo(tmp_path / "secret" / "private.png")
    root = tmp_path / "in"
    photo(root / "ok.png")
    (root / "link.png").symlink_to(outside)
    (root / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "weird\nname.png").write_bytes(b"x")
    checked = check_image_folder(root)
    assert [p.name for p in checked.files] == ["ok.png"]
    reasons = dict(checked.skipped)
    assert "outside" in reasons["link.png"] and "weird\nname.png" in reasons
    assert all(outside.parent not in p.resolve().parents for p in checked.files)


# ---- pretraining: checked before, robust during ---------------------------------------------------------------

def test_a_file_that_breaks_during_a_run_is_replaced_by_another_item_with_one_warning(tmp_path, caplog):
    from torch.utils.data import DataLoader

    from detkit.data.device_views import SourceImage
    from detkit.data.unlabeled import SimCLRViews, UnlabeledImages

    root = tmp_path / "in"
    for i in range(6):
        photo(root / f"img_{i}.png", seed=i)
    for transform in (SimCLRViews(32), SourceImage(48)):
        dataset = UnlabeledImages(root, transform)
        (root / "img_2.png").write_bytes(b"replaced by garbage during the run")
        with caplog.at_level(logging.WARNING):
            batches = [b for _ in range(2) for b in DataLoader(dataset, batch_size=3, num_workers=0)]
        assert len(batches) == 4 and all(len(b[0]) == 3 for b in batches)  # fixed-size batches
        assert caplog.text.count("img_2.png") == 1, caplog.text  # warned once per file
        caplog.clear()
        photo(root / "img_2.png", seed=2)
        from detkit.data import image_files
        image_files._UNREADABLE.clear()


def test_pretraining_trains_on_the_readable_images_and_records_the_skipped_ones(synthetic, tmp_path):
    from hydra import compose, initialize_config_dir

    from detkit.cli.pretrain import pretrain
    from detkit.paths import config_dir

    _, root = synthetic
    (root / "broken.jpg").write_bytes(b"this is not an image")
    (root / "notes.txt").write_text("hello")
    overrides = [f"data.images={root}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                 "trainer.max_epochs=1"]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides)
        strict = compose("pretrain", overrides=[*overrides, "data.skip_invalid=false"])
    assert pretrain(cfg, tmp_path / "pre").is_file()
    metrics = load(tmp_path / "pre" / "pretrain_metrics.json")
    assert metrics["input_check"]["images"] == 8 and metrics["input_check"]["skipped"] == 1
    assert metrics["input_check"]["skipped_files"][0]["file"] == "broken.jpg"
    with pytest.raises(ImageFolderError, match="broken.jpg"):
        pretrain(strict, tmp_path / "strict")
    assert not (tmp_path / "strict" / "checkpoints").exists()


def test_pretrain_on_a_folder_where_nothing_decodes_is_one_line_naming_it(tmp_path):
    from tests.helpers import cli

    root = tmp_path / "scraped"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"not an image")
    truncated_jpeg(root / "b.jpg")
    r = cli("detkit-pretrain", f"data.images={root}", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'out'}")
    text = r.output
    assert r.returncode == 1 and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(root) in errors[0] and "none of the 2 image files" in errors[0], text


def test_knn_monitor_folders_are_checked_too(tmp_path):
    from detkit.data.unlabeled import ImageFolderDataset, ResizeImage

    for cls in ("a", "b"):
        for i in range(2):
            photo(tmp_path / "tree" / cls / f"{i}.png", seed=i)
    (tmp_path / "tree" / "b" / "bad.png").write_bytes(b"garbage")
    dataset = ImageFolderDataset(tmp_path / "tree", ResizeImage(16))
    assert len(dataset) == 4 and [label for _, label in dataset] == [0, 0, 1, 1]
    with pytest.raises(ImageFolderError, match="bad.png"):
        ImageFolderDataset(tmp_path / "tree", ResizeImage(16), skip_invalid=False)


# ---- prediction ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained YOLO detector's checkpoint (what DetectionModule.from_checkpoint reads), made once per module."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from detkit.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["model=yolo", "paths.output_dir=/tmp/x"])
    module = instantiate(cfg.model, categories=[{"id": 1, "name": "thing"}], image_size=64, _recursive_=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def compose_predict(*overrides: str):
    from hydra import compose, initialize_config_dir

    from detkit.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("predict", overrides=["device=cpu", "num_workers=0", "score_threshold=0.0", *overrides])


def test_predict_writes_the_good_images_and_names_the_broken_ones(checkpoint, tmp_path):
    """The issue's scenario, as a user runs it (a loader worker, the entry point on a command line)."""
    from tests.helpers import cli

    root = messy_folder(tmp_path / "in", good=1)
    out = tmp_path / "pred"
    r = cli("detkit-predict", f"checkpoint={checkpoint}", f"input={root}", "device=cpu", "num_workers=1",
            "score_threshold=0.0", f"hydra.run.dir={out}")
    text = r.output
    assert r.returncode == 0 and "Traceback" not in text, text
    assert "'broken.jpg'" in text and "'truncated.jpg'" in text
    preds = load(out / "predictions.json")
    assert [Path(im["file_name"]).name for im in preds["images"]] == ["good_0.png"]
    assert preds["info"]["skipped"] == 2 and preds["info"]["ignored_non_image_files"] == 1
    assert {s["file"] for s in preds["info"]["skipped_files"]} == {"broken.jpg", "truncated.jpg"}
    assert [p.name for p in (out / "visualizations").iterdir()] == ["good_0.png.jpg"]


def test_predict_refuses_with_skip_invalid_false_and_on_empty_or_all_broken_folders(checkpoint, tmp_path):
    from detkit.cli.predict import predict

    root = messy_folder(tmp_path / "in", good=1)
    with pytest.raises(ImageFolderError, match="broken.jpg"):
        predict(compose_predict(f"checkpoint={checkpoint}", f"input={root}", "skip_invalid=false"), tmp_path / "o")
    assert not (tmp_path / "o" / "predictions.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        predict(compose_predict(f"checkpoint={checkpoint}", f"input={tmp_path / 'empty'}"), tmp_path / "o")
    with pytest.raises(ImageFolderError, match="none of the 1 image files"):
        predict(compose_predict(f"checkpoint={checkpoint}", f"input={root / 'broken.jpg'}"), tmp_path / "o")


def test_predict_skips_a_file_that_breaks_during_the_run(checkpoint, tmp_path, monkeypatch, caplog):
    import detkit.data.image_files as image_files
    from detkit.cli.predict import predict

    root = tmp_path / "in"
    for i in range(3):
        photo(root / f"good_{i}.png", seed=i)
    (root / "later_broken.png").write_bytes(b"replaced during the run")
    monkeypatch.setattr(image_files, "probe_image", lambda p: (SIZE, None))  # it was fine when checked
    with caplog.at_level(logging.WARNING):
        predict(compose_predict(f"checkpoint={checkpoint}", f"input={root}", "batch_size=2"), tmp_path / "o")
    preds = load(tmp_path / "o" / "predictions.json")
    assert [Path(im["file_name"]).name for im in preds["images"]] == ["good_0.png", "good_1.png", "good_2.png"]
    assert [s["file"] for s in preds["info"]["skipped_files"]] == ["later_broken.png"]
    assert "later_broken.png" in caplog.text


def test_yolo_conversion_leaves_an_unreadable_image_out_and_says_so(tmp_path):
    from detkit.data.convert import yolo_to_coco

    photo(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    coco, problems = yolo_to_coco(tmp_path / "labels", tmp_path / "images", ["thing"])
    assert [im["file_name"] for im in coco["images"]] == ["good.png"] and len(coco["annotations"]) == 1
    assert len(problems) == 1 and "broken.jpg" in problems[0] and "not a readable image" in problems[0]


def test_predict_drawings_of_same_named_files_do_not_overwrite_each_other(checkpoint, tmp_path):
    """``a.jpg``, ``a.png`` and ``sub/a.jpg`` are three images: three drawings, in the input's tree."""
    from detkit.cli.predict import predict

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    for name in ("a.jpg", "a.png", "sub/a.jpg"):
        cv2.imwrite(str(root / name), img)
    out = tmp_path / "o"
    predict(compose_predict(f"checkpoint={checkpoint}", f"input={root}", "draw=true"), out)
    drawn = sorted(p.relative_to(out / "visualizations").as_posix() for p in (out / "visualizations").rglob("*.jpg"))
    assert drawn == ["a.jpg.jpg", "a.png.jpg", "sub/a.jpg.jpg"]
