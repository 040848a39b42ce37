"""Shared fixtures: synthetic COCO data, the image-check cache, and one trained run for the whole session (helpers
that are not fixtures are in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `make test` runs the suite in two pytest-xdist workers (one per core of the 2-core machines it is sized for): each
# worker, and every process its tests start (they inherit the environment), then computes on one thread instead of
# one per core each. Before torch is imported; an OMP_NUM_THREADS the caller set is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from detkit.data.synthetic import make_synthetic_coco  # noqa: E402
from tests.helpers import TINY_FRCNN, cli, data_args  # noqa: E402


# Files whose tests take longest (measured with --durations=0 on 2 idle cores), handed out first: `make test` gives
# whole files to the two workers in collection order (--dist loadfile --no-loadscope-reorder), and a long file
# handed out last keeps one worker busy while the other idles (longest first: the classic greedy schedule).
LONGEST_FIRST = (  # 2026-12-01, s of test time: 65, 54, 54, 43, 30, 25
    "tests/integration/test_stability.py",
    "tests/cli/test_commands.py",
    "tests/scripts/test_gpu_session.py",
    "tests/cli/test_study.py",
    "tests/integration/test_resume.py",
    "tests/cli/test_sweep.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    missing = [name for name in LONGEST_FIRST if not (config.rootpath / name).is_file()]
    assert not missing, f"LONGEST_FIRST names files that do not exist (renamed?): {missing}"
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # sort is stable: the rest keep their collection order, each file's tests theirs
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True, scope="session")
def image_check_cache(tmp_path_factory) -> None:
    """detkit's per-folder image-check cache (:mod:`detkit.data.image_files`) goes under the session's temporary
    directory, not the user's ``~/.cache`` (subprocesses inherit it)."""
    os.environ.setdefault("DETKIT_CACHE_DIR", str(tmp_path_factory.mktemp("detkit_cache")))


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """8 synthetic images (ids from 0, every 4th empty) -> (ann_file, image_root)."""
    return make_synthetic_coco(tmp_path / "syn", num_images=8, first_id=0, empty_every=4)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> tuple[Path, Path]:
    """The same 8 synthetic images, made once for the session (read-only: copy before changing them)."""
    return make_synthetic_coco(tmp_path_factory.mktemp("syn"), num_images=8, first_id=0, empty_every=4)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_set) -> Path:
    """One ``detkit-train`` run (Faster R-CNN, debug=tiny_frcnn, 2 epochs) on :func:`synthetic_set`, run in-process
    once per session and shared by the CLI, report and export tests: its directory holds what a user's run holds
    (``.hydra/config.yaml``, ``checkpoints/{best,last}.ckpt``, ``metrics.json``, ``run.json``, ``report.html``,
    ``predictions.json``, curves). Tests that change files in it work on a copy (:func:`copy_run`)."""
    ann, root = synthetic_set
    out = tmp_path_factory.mktemp("trained") / "run"
    r = cli("detkit-train", *data_args(ann, root), *TINY_FRCNN, "trainer.max_epochs=2", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output[-3000:]
    return out
