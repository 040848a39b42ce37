"""Stage the public benchmark datasets of ``docs/datasets.md`` into ``.bench_data/<name>/`` (git-ignored).

Each dataset becomes ``.bench_data/<name>/images/`` (the original files, byte for byte, original resolution) plus
``.bench_data/<name>/annotations.json`` (COCO, written by detkit's own converter, ``detkit-convert``), holding a
deterministic subset of at most ``--max-images`` images (150 by default). ``.bench_data/SOURCES.md`` records the
source repository, commit, licence and the counts and sizes of what was staged.

Where the data comes from
-------------------------
Every dataset is pinned to one commit of one public GitHub repository (``DATASETS`` below). The script reads the
files out of a local copy of that repository, in either form:

* a bare snapshot brought by the session tool ``fetch github:<owner>/<name>``, which lands in
  ``/work/.mirror/<owner>+<name>/repo`` (the default place looked in; ``--mirror-root`` changes it), or
* an ordinary clone: ``git clone https://github.com/<owner>/<name>`` (then pass ``--repo <dataset>=<path>``; the
  pinned commit must be in the clone, ``git -C <path> checkout <commit>`` is not needed, files are read from git's
  object store). A plain folder without ``.git`` (e.g. an unpacked zip of the pinned commit) is read as it is, with
  a warning that its commit cannot be checked.

Examples::

    # after `fetch github:leolee1204/yolov7` etc. for the five repositories
    .venv/bin/python scripts/stage_bench_data.py
    .venv/bin/python scripts/stage_bench_data.py --only uno_cards --repo uno_cards=~/src/yolov7
    .venv/bin/python scripts/stage_bench_data.py --list

Then check one with ``detkit-data-check .bench_data/<name>/annotations.json .bench_data/<name>/images`` (the script
runs that check itself at the end; ``--no-check`` skips it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str
    repo: str  # owner/name on GitHub
    commit: str
    licence: str
    fmt: str  # "yolo" or "voc"
    # YOLO: split folders each holding images/ and labels/; VOC: (annotation folder, image folder) pairs
    folders: tuple
    classes: tuple = ()  # YOLO class names in index order (as the export's data.yaml lists them)
    select: str = "hash"  # "hash" (sha1 of the file stem), "most_boxes" (crowded first) or "all"
    notes: tuple = ()
    reserve: bool = False  # staged only with --include-reserve (or --only)


DATASETS = [
    Dataset(
        name="uno_cards",
        kind="many classes of small, similar objects",
        repo="leolee1204/yolov7",
        commit="1c498bceb7d9f448c193972f4a8c821be13a5f32",
        licence=("Roboflow 'Uno Cards' (universe.roboflow.com/object-detection/uno-cards, by Adam Crawshaw); "
                 "Uno/README.dataset.txt: 'License: MIT' - 'released with a modified MIT license: "
                 "https://firstdonoharm.dev/' (the Hippocratic License). The repository has no LICENSE file."),
        fmt="yolo",
        folders=("Uno/train",),
        classes=("0", "1", "10", "11", "12", "13", "14", "2", "3", "4", "5", "6", "7", "8", "9"),
        notes=("Uno/data.yaml lists the 15 class names as numeric strings sorted as text ('0','1','10',...,'14',"
               "'2',...,'9'): YOLO index k is the k-th name of that list, not the number k. '10'..'14' are not "
               "documented; by eye: 10 wild draw four, 11 draw two, 12 reverse, 13 skip, 14 wild.",
               "Synthetic: photographed card faces pasted onto texture backgrounds; every image has exactly 3 "
               "boxes, around the corner symbols of 3 overlapping cards, each about 25 px in a 416 x 416 image."),
    ),
    Dataset(
        name="aerial_maritime",
        kind="aerial / top-down images",
        repo="nakabeppu/ssd_pytorch-lightning",
        commit="8b0d9798b2ff3ea7b647ede8ccde5829503d5cd6",
        licence=("Roboflow 'Aerial Maritime Drone' v9 tiled (public.roboflow.com/object-detection/aerial-maritime), "
                 "MIT: the repository's README says 'This dataset is released under the MIT License' and its "
                 "LICENSE.txt is MIT."),
        fmt="voc",
        folders=(("data/Aerial Maritime.v9-tiled.voc/train", "data/Aerial Maritime.v9-tiled.voc/train"),),
        notes=("Tiles (800 x 600) cut by Roboflow from 74 Mavic Air 2 photos taken at 400 ft; boxes are cut at "
               "the tile borders (xmin 1 / xmax 800 are common), so one dock or boat can appear as several boxes.",),
    ),
    Dataset(
        name="oxford_pets_heads",
        kind="large single objects",
        repo="Naveen-Dodda/Sample_Pets_dataset",
        commit="9281626a62066c09f278b9b41ac4bad3683d7541",
        licence=("Oxford-IIIT Pet (www.robots.ox.ac.uk/~vgg/data/pets/), 3-breed subset. The repository has no "
                 "LICENSE; its README names the source. The bundled annotations/README (2012) says 'made available "
                 "for research purposes only'; the dataset's page now gives CC BY-SA 4.0 (copyright of the images "
                 "stays with their owners)."),
        fmt="voc",
        folders=(("annotations/xmls", "images"),),
        notes=("Head boxes (VOC xml, class 'cat' or 'dog' = species) exist only for the trainval images (296 of "
               "603); the breed is in the file name only.",),
    ),
    Dataset(
        name="aquarium_crowded",
        kind="crowded scenes",
        repo="sumit2011/underwater-object-detection",
        commit="eee4be3324cd019b9032bb13f22a756a77866503",
        licence=("Roboflow 'Aquarium' raw-1024 (public.roboflow.ai/object-detection/aquarium); "
                 "dataset/aquarium_pretrain/README.dataset.txt: 'License: CC BY 4.0'. (The repository's own "
                 "LICENSE, MIT, covers its code.)"),
        fmt="yolo",
        folders=("dataset/aquarium_pretrain/train", "dataset/aquarium_pretrain/valid",
                 "dataset/aquarium_pretrain/test"),
        classes=("fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"),
        select="most_boxes",
        notes=("The subset is the most crowded images of all three splits (most boxes first, ties by file name).",
               "Images were resized by Roboflow to fit 1024 px (mostly 768 x 1024, portrait)."),
    ),
    Dataset(
        name="packages",
        kind="large objects (reserve: Public Domain, but 1-2 medium boxes per image)",
        repo="supertaco343/Capstone-1-Security-System",
        commit="ad7d0b91052690d173b877d84179cbfa3ad02310",
        licence=("Roboflow 'Packages' v6 raw (universe.roboflow.com/joseph-nelson/packages-g0ton); "
                 "README.dataset.txt and data.yaml: 'License: Public Domain'. The repository has no LICENSE file."),
        fmt="yolo",
        folders=("datasets/Packages.v6-raw.yolov11/train", "datasets/Packages.v6-raw.yolov11/valid",
                 "datasets/Packages.v6-raw.yolov11/test"),
        classes=("package",),
        select="all",
        reserve=True,
    ),
]
BY_NAME = {d.name: d for d in DATASETS}


# ---------------------------------------------------------------------------------------------------- sources


class GitSource:
    """Files of one commit, read from a git directory (a bare snapshot or a clone's ``.git``)."""

    def __init__(self, git_dir: Path, commit: str) -> None:
        self.git_dir, self.commit = git_dir, commit

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True, text=True,
                              check=True).stdout

    def has_commit(self) -> bool:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", "cat-file", "-e", f"{self.commit}^{{commit}}"],
                              capture_output=True).returncode == 0

    def list(self, folder: str) -> dict[str, tuple[str, int]]:
        """Files directly in ``folder``: name -> (blob id, size)."""
        out = {}
        for line in self._git("ls-tree", "-l", f"{self.commit}:{folder}").splitlines():
            meta, name = line.split("\t", 1)
            _mode, kind, sha, size = meta.split()
            if kind == "blob":
                out[name] = (sha, int(size))
        return out

    def read(self, folder: str, names: list[str], listing: dict) -> dict[str, bytes]:
        shas = [listing[n][0] for n in names]
        proc = subprocess.Popen(["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        blobs = {}
        for name, sha in zip(names, shas):
            proc.stdin.write(f"{sha}\n".encode())
            proc.stdin.flush()
            header = proc.stdout.readline().split()
            size = int(header[2])
            blobs[name] = proc.stdout.read(size)
            proc.stdout.read(1)
        proc.stdin.close()
        proc.wait()
        return blobs


class DirSource:
    """Files of a plain folder (no git metadata: the commit cannot be checked)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self, folder: str) -> dict[str, tuple[str, int]]:
        base = self.root / folder
        return {p.name: ("", p.stat().st_size) for p in sorted(base.iterdir()) if p.is_file()}

    def read(self, folder: str, names: list[str], listing: dict) -> dict[str, bytes]:
        return {n: (self.root / folder / n).read_bytes() for n in names}


def open_source(ds: Dataset, path: Path | None, mirror_root: Path) -> tuple[object, str]:
    if path is None:
        path = mirror_root / ds.repo.replace("/", "+") / "repo"
        if not path.exists():
            raise SystemExit(f"{ds.name}: no copy of github.com/{ds.repo} at {path}. Bring it with the session tool "
                             f"`fetch github:{ds.repo}`, or `git clone https://github.com/{ds.repo}` and pass "
                             f"--repo {ds.name}=<clone>.")
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise SystemExit(f"{ds.name}: {path} is not a folder (want a clone of github.com/{ds.repo}, its .git, or a "
                         f"`fetch` snapshot)")
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        git_dir = path
    elif (path / ".git").exists():
        git_dir = path / ".git"
    else:
        print(f"warning: {ds.name}: {path} is not a git repository; reading its files as they are "
             f"(commit {ds.commit} cannot be checked)", file=sys.stderr)
        return DirSource(path), "unchecked (plain folder)"
    src = GitSource(git_dir, ds.commit)
    if not src.has_commit():
        raise SystemExit(f"{ds.name}: commit {ds.commit} is not in {git_dir}; "
                         f"`git -C <clone> fetch origin {ds.commit}` or re-fetch the snapshot.")
    return src, ds.commit


# ---------------------------------------------------------------------------------------------------- staging


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _hash_key(stem: str) -> str:
    return hashlib.sha1(stem.encode()).hexdigest()


@dataclass
class Candidate:
    stem: str
    image: tuple  # (folder, file name)
    label: tuple | None  # (folder, file name) of the .txt / .xml
    boxes: int


def _yolo_candidates(ds: Dataset, src) -> tuple[list[Candidate], dict]:
    cands, listings, totals = [], {}, Counter()
    for split in ds.folders:
        imgs = src.list(f"{split}/images")
        labs = src.list(f"{split}/labels")
        listings[f"{split}/images"], listings[f"{split}/labels"] = imgs, labs
        texts = src.read(f"{split}/labels", sorted(labs), labs)
        for name in sorted(imgs):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            lab = _stem(name) + ".txt"
            n = 0
            if lab in texts:
                n = sum(1 for line in texts[lab].decode().splitlines() if line.strip())
            cands.append(Candidate(_stem(name), (f"{split}/images", name),
                                   (f"{split}/labels", lab) if lab in labs else None, n))
            totals["images"] += 1
            totals["boxes"] += n
    return cands, {"listings": listings, "totals": totals}


def _voc_candidates(ds: Dataset, src) -> tuple[list[Candidate], dict]:
    import xml.etree.ElementTree as ET

    cands, listings, totals = [], {}, Counter()
    for ann_folder, img_folder in ds.folders:
        anns = src.list(ann_folder)
        imgs = anns if img_folder == ann_folder else src.list(img_folder)
        listings[ann_folder], listings[img_folder] = anns, imgs
        xml_names = sorted(n for n in anns if n.endswith(".xml"))
        texts = src.read(ann_folder, xml_names, anns)
        for name in xml_names:
            root = ET.fromstring(texts[name])
            file_name = root.findtext("filename") or _stem(name) + ".jpg"
            if file_name not in imgs:
                print(f"warning: {ds.name}: {ann_folder}/{name} names {file_name!r}, which is not in {img_folder}; "
                      f"skipped", file=sys.stderr)
                continue
            n = len(root.findall("object"))
            cands.append(Candidate(_stem(name), (img_folder, file_name), (ann_folder, name), n))
            totals["images"] += 1
            totals["boxes"] += n
    return cands, {"listings": listings, "totals": totals}


SELECTORS: dict[str, Callable[[list[Candidate]], list[Candidate]]] = {
    "hash": lambda c: sorted(c, key=lambda x: _hash_key(x.stem)),
    "most_boxes": lambda c: sorted(c, key=lambda x: (-x.boxes, x.stem)),
    "all": lambda c: sorted(c, key=lambda x: x.stem),
}


def _convert(ds: Dataset, work: Path, out_json: Path) -> list[str]:
    """Run detkit-convert (through this interpreter) on the materialised subset; returns its warnings."""
    cmd = [sys.executable, "-m", "detkit.cli.convert", ds.fmt]
    if ds.fmt == "yolo":
        cmd += [str(work / "labels"), str(work / "images"), str(out_json), "--classes", ",".join(ds.classes)]
    else:
        cmd += [str(work / "ann"), str(work / "images"), str(out_json)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{ds.name}: detkit-convert failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    print(f"  {res.stdout.strip()}")
    return [line for line in res.stderr.splitlines() if line.strip()]


def stage(ds: Dataset, src, commit: str, out_root: Path, max_images: int) -> dict:
    cands, info = (_yolo_candidates if ds.fmt == "yolo" else _voc_candidates)(ds, src)
    chosen = SELECTORS[ds.select](cands)[:max_images]
    chosen.sort(key=lambda c: c.image[1])
    dest = out_root / ds.name
    if dest.exists():
        for p in sorted(dest.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    (dest / "images").mkdir(parents=True)
    listings = info["listings"]
    with tempfile.TemporaryDirectory(prefix=f"stage_{ds.name}_") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        (work / ("labels" if ds.fmt == "yolo" else "ann")).mkdir()
        by_folder: dict[str, list[str]] = {}
        for c in chosen:
            by_folder.setdefault(c.image[0], []).append(c.image[1])
            if c.label is not None:
                by_folder.setdefault(c.label[0], []).append(c.label[1])
        blobs = {}
        for folder, names in by_folder.items():
            for name, data in src.read(folder, names, listings[folder]).items():
                blobs[(folder, name)] = data
        seen = set()
        for c in chosen:
            if c.image[1] in seen:
                raise SystemExit(f"{ds.name}: two images are named {c.image[1]}; cannot flatten the splits")
            seen.add(c.image[1])
            data = blobs[c.image]
            (work / "images" / c.image[1]).write_bytes(data)
            (dest / "images" / c.image[1]).write_bytes(data)
            if c.label is not None:
                sub = "labels" if ds.fmt == "yolo" else "ann"
                (work / sub / c.label[1]).write_bytes(blobs[c.label])
        warnings = _convert(ds, work, dest / "annotations.json")
    (dest / "annotations_categories.txt").unlink(missing_ok=True)
    return {"dataset": ds, "commit": commit, "totals": info["totals"], "warnings": warnings, "max_images": max_images,
            "stats": subset_stats(dest / "annotations.json")}


def _balanced_pick(cands: list[Candidate], classes_of: dict[str, list[int]], n: int) -> list[Candidate]:
    """Greedy, deterministic: each step takes the image whose boxes are of the rarest classes so far.

    Score of an image: sum over its boxes of 1 / (1 + boxes of that class already taken); ties go to the earlier
    image in sha1(stem) order. Classes absent so far score 1 per box, so all classes are covered first.
    """
    pool = SELECTORS["hash"](cands)
    taken, counts = [], Counter()
    for _ in range(min(n, len(pool))):
        best = max(range(len(pool)), key=lambda i: (sum(1 / (1 + counts[c]) for c in classes_of[pool[i].stem]), -i))
        chosen = pool.pop(best)
        counts.update(classes_of[chosen.stem])
        taken.append(chosen)
    return sorted(taken, key=lambda c: c.image[1])


def _fit_image(data: bytes, max_side: int, quality: int) -> tuple[bytes, float]:
    """The original bytes when the longest side is <= max_side, else a resized JPEG; returns (bytes, scale)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if max(w, h) <= max_side:
            return data, 1.0
        scale = max_side / max(w, h)
        small = im.convert("RGB").resize((round(w * scale), round(h * scale)), Image.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), scale


def make_test_subset(ds: Dataset, src, commit: str, dest: Path, n: int, max_side: int, quality: int) -> dict:
    """A tiny class-balanced subset for a committed test fixture: images/ + annotations.json (COCO)."""
    if ds.fmt != "yolo":
        raise SystemExit("--test-subset is written for the YOLO datasets")
    cands, info = _yolo_candidates(ds, src)
    listings = info["listings"]
    classes_of: dict[str, list[int]] = {c.stem: [] for c in cands}
    for split in ds.folders:  # the label files are small: read them all to know each image's classes
        labs = listings[f"{split}/labels"]
        for name, data in src.read(f"{split}/labels", sorted(labs), labs).items():
            classes_of[_stem(name)] = [int(line.split()[0]) for line in data.decode().splitlines() if line.strip()]
    chosen = _balanced_pick([c for c in cands if classes_of[c.stem]], classes_of, n)
    if dest.exists():
        for p in sorted(dest.rglob("*"), reverse=True):
            if p.name != "README.md":
                p.unlink() if p.is_file() else p.rmdir()
    (dest / "images").mkdir(parents=True, exist_ok=True)
    scales = {}
    with tempfile.TemporaryDirectory(prefix=f"testsubset_{ds.name}_") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        (work / "labels").mkdir()
        for c in chosen:
            img = src.read(c.image[0], [c.image[1]], listings[c.image[0]])[c.image[1]]
            lab = src.read(c.label[0], [c.label[1]], listings[c.label[0]])[c.label[1]]
            (work / "images" / c.image[1]).write_bytes(img)
            (work / "labels" / c.label[1]).write_bytes(lab)
            small, scale = _fit_image(img, max_side, quality)
            name = c.image[1] if scale == 1.0 else _stem(c.image[1]) + ".jpg"
            (dest / "images" / name).write_bytes(small)
            scales[c.image[1]] = (name, scale)
        warnings = _convert(ds, work, work / "annotations.json")
        coco = json.loads((work / "annotations.json").read_text())
    for im in coco["images"]:
        name, scale = scales[im["file_name"]]
        im["file_name"] = name
        if scale != 1.0:
            im["width"], im["height"] = round(im["width"] * scale), round(im["height"] * scale)
            for a in coco["annotations"]:
                if a["image_id"] == im["id"]:
                    a["bbox"] = [round(v * scale, 2) for v in a["bbox"]]
                    a["area"] = round(a["bbox"][2] * a["bbox"][3], 2)
    (dest / "annotations.json").write_text(json.dumps(coco))
    resized = sum(1 for _, s in scales.values() if s != 1.0)
    return {"images": [c.image for c in chosen], "resized": resized, "warnings": warnings,
            "stats": subset_stats(dest / "annotations.json")}


def subset_stats(ann_json: Path) -> dict:
    coco = json.loads(ann_json.read_text())
    images = {im["id"]: im for im in coco["images"]}
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    w = [a["bbox"][2] for a in coco["annotations"]]
    h = [a["bbox"][3] for a in coco["annotations"]]
    scale = [320 / max(images[a["image_id"]]["width"], images[a["image_id"]]["height"]) for a in coco["annotations"]]
    sizes = Counter((im["width"], im["height"]) for im in coco["images"])
    cats_present = {a["category_id"] for a in coco["annotations"]}
    counts = [per_image.get(i, 0) for i in images]
    return {
        "images": len(images), "boxes": len(coco["annotations"]),
        "classes": len(coco["categories"]), "classes_present": len(cats_present),
        "sizes": sizes.most_common(3), "distinct_sizes": len(sizes),
        "box_w": statistics.median(w) if w else 0, "box_h": statistics.median(h) if h else 0,
        "box_w320": statistics.median(x * s for x, s in zip(w, scale)) if w else 0,
        "box_h320": statistics.median(x * s for x, s in zip(h, scale)) if h else 0,
        "per_image_median": statistics.median(counts) if counts else 0, "per_image_max": max(counts, default=0),
    }


def check(dest: Path) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "detkit.cli.data_check", str(dest / "annotations.json"),
                          str(dest / "images"), "--workers", "2"], capture_output=True, text=True)
    return res.returncode, (res.stdout + res.stderr).strip()


SOURCES_HEADER = ("# Benchmark datasets staged by scripts/stage_bench_data.py\n\n"
                  "Original files and resolution, a deterministic subset of each; `annotations.json` is COCO written "
                  "by `detkit-convert`. See docs/datasets.md for the full datasets.\n")


def _folders_text(ds: Dataset) -> str:
    if ds.fmt == "yolo":
        return ", ".join(f"{f}/{{images,labels}}" for f in ds.folders)
    return ", ".join(f"xml in {a}, images in {i}" for a, i in ds.folders)


def dataset_section(r: dict) -> str:
    ds, s, t = r["dataset"], r["stats"], r["totals"]
    size_txt = ", ".join(f"{w}x{h} ({n})" for (w, h), n in s["sizes"])
    lines = [f"## {ds.name} ({ds.kind})", "",
             f"- source: https://github.com/{ds.repo} at commit {r['commit']} ({_folders_text(ds)})",
             f"- licence: {ds.licence}",
             f"- whole source folders: {t['images']} images, {t['boxes']} boxes",
             f"- staged (at most {r['max_images']}): {s['images']} images, {s['boxes']} boxes, {s['classes']} classes "
             f"({s['classes_present']} present); boxes per image median {s['per_image_median']}, "
             f"max {s['per_image_max']}; selection `{ds.select}`",
             f"- image sizes: {size_txt} ({s['distinct_sizes']} distinct)",
             f"- median box {s['box_w']:.0f} x {s['box_h']:.0f} px; {s['box_w320']:.0f} x {s['box_h320']:.0f} px "
             f"with the longest image side at 320",
             f"- detkit-data-check: {r.get('check', 'not run')}"]
    lines += [f"- note: {n}" for n in ds.notes]
    lines += [f"- detkit-convert: {w}" for w in r["warnings"][:10]]
    if len(r["warnings"]) > 10:
        lines.append(f"- detkit-convert: ... {len(r['warnings']) - 10} more warning(s)")
    return "\n".join(lines) + "\n"


def write_sources(path: Path, results: list[dict]) -> None:
    """Rewrite ``SOURCES.md``: sections of the datasets staged now replace theirs; the others are kept."""
    sections: dict[str, str] = {}
    if path.exists():
        for chunk in path.read_text().split("\n## ")[1:]:
            sections[chunk.split(" ", 1)[0]] = "## " + chunk.rstrip("\n") + "\n"
    for r in results:
        sections[r["dataset"].name] = dataset_section(r)
    order = [d.name for d in DATASETS] + sorted(set(sections) - set(BY_NAME))
    path.write_text(SOURCES_HEADER + "".join("\n" + sections[n] for n in order if n in sections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / ".bench_data"), help="output root (default .bench_data)")
    parser.add_argument("--mirror-root", default="/work/.mirror",
                        help="where `fetch` puts snapshots: <root>/<owner>+<name>/repo (default /work/.mirror)")
    parser.add_argument("--repo", action="append", default=[], metavar="NAME=PATH",
                        help="a local copy (bare git dir, clone, or plain folder) for dataset NAME")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="stage only these datasets")
    parser.add_argument("--include-reserve", action="store_true", help="also stage the reserve dataset(s)")
    parser.add_argument("--max-images", type=int, default=150)
    parser.add_argument("--no-check", action="store_true", help="skip detkit-data-check")
    parser.add_argument("--list", action="store_true", help="list the datasets and exit")
    parser.add_argument("--test-subset", metavar="DIR",
                        help="instead of staging: write a tiny class-balanced subset of --only NAME (default "
                             "uno_cards) to DIR (images/ + annotations.json), e.g. tests/data/uno_cards")
    parser.add_argument("--test-images", type=int, default=8, help="images in --test-subset (default 8)")
    parser.add_argument("--test-max-side", type=int, default=640,
                        help="--test-subset: longer images are downscaled to this longest side (default 640)")
    parser.add_argument("--test-quality", type=int, default=85, help="--test-subset: JPEG quality of resized images")
    args = parser.parse_args(argv)

    if args.list:
        for d in DATASETS:
            print(f"{d.name:20s} {d.kind} - github.com/{d.repo}@{d.commit[:12]}{' (reserve)' if d.reserve else ''}")
        return 0
    paths = {}
    for item in args.repo:
        name, _, path = item.partition("=")
        if name not in BY_NAME or not path:
            parser.error(f"--repo wants NAME=PATH with NAME one of {sorted(BY_NAME)}, got {item!r}")
        paths[name] = Path(path)
    unknown = [n for n in args.only if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; known: {sorted(BY_NAME)}")
    chosen = [BY_NAME[n] for n in args.only] if args.only else [d for d in DATASETS
                                                               if args.include_reserve or not d.reserve]
    if args.test_subset:
        ds = BY_NAME[args.only[0]] if args.only else BY_NAME["uno_cards"]
        src, commit = open_source(ds, paths.get(ds.name), Path(args.mirror_root))
        r = make_test_subset(ds, src, commit, Path(args.test_subset), args.test_images, args.test_max_side,
                             args.test_quality)
        s = r["stats"]
        print(f"{args.test_subset}: {s['images']} images ({r['resized']} resized), {s['boxes']} boxes, "
              f"{s['classes_present']} of {s['classes']} classes; median box {s['box_w']:.0f} x {s['box_h']:.0f} px")
        for folder, name in r["images"]:
            print(f"  {folder}/{name}")
        for w in r["warnings"]:
            print(f"  detkit-convert: {w}")
        if not args.no_check:
            rc, text = check(Path(args.test_subset))
            print(f"  detkit-data-check: {text}")
            return 1 if rc else 0
        return 0
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for ds in chosen:
        print(f"{ds.name}: github.com/{ds.repo} @ {ds.commit[:12]}")
        src, commit = open_source(ds, paths.get(ds.name), Path(args.mirror_root))
        r = stage(ds, src, commit, out_root, args.max_images)
        if not args.no_check:
            rc, text = check(out_root / ds.name)
            r["check"] = "OK" if rc == 0 else f"exit {rc}: " + " | ".join(text.splitlines()[:5])
            print(f"  detkit-data-check: {text.splitlines()[-1] if rc == 0 else text}")
            if rc != 0:
                failed.append(ds.name)
        results.append(r)
    write_sources(out_root / "SOURCES.md", results)
    print(f"wrote {out_root / 'SOURCES.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
