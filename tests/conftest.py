"""Shared fixtures: synthetic COCO data, the embedded BCCD split, the developer's ../shared datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from detkit.data.synthetic import make_synthetic_coco

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"
SHARED = ROOT.parent / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets (developer checkouts and CI)")


def env_with_path(*paths: str | Path, base: dict | None = None) -> dict:
    """The environment for a subprocess with ``paths`` put in front of ``PYTHONPATH`` (the caller's entries are kept:
    where detkit's dependencies are installed on ``PYTHONPATH``, a subprocess must still find them)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.fixture(autouse=True, scope="session")
def image_check_cache(tmp_path_factory) -> None:
    """detkit's per-folder image-check cache (:mod:`detkit.data.image_files`) goes under the session's temporary
    directory, not the user's ``~/.cache`` (subprocesses inherit it)."""
    os.environ.setdefault("DETKIT_CACHE_DIR", str(tmp_path_factory.mktemp("detkit_cache")))


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """8 synthetic images (ids from 0, every 4th empty) -> (ann_file, image_root)."""
    return make_synthetic_coco(tmp_path / "syn", num_images=8, first_id=0, empty_every=4)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def dump(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data))
    return path
