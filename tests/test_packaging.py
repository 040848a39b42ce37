"""Packaging: every package is listed for the wheel, and the config tree is found from a regular install."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from detkit.paths import config_dir
from tests.helpers import ROOT, env_with_path


def test_every_detkit_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "detkit").rglob("__init__.py")}
    assert found | {"detkit.conf"} == listed


def test_config_dir_is_found_in_a_checkout():
    assert (config_dir() / "train.yaml").is_file() and (config_dir() / "model" / "faster_rcnn.yaml").is_file()


@pytest.mark.slow
def test_a_regular_install_ships_conf_and_runs_a_hydra_app(tmp_path):
    """Build the wheel, install it into a bare target directory and compose the train config from outside the
    repository (a plain `pip install .`)."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(wheel_dir)],
                   check=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("detkit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    r = subprocess.run([sys.executable, "-m", "detkit.cli.train", "--cfg", "job"], capture_output=True, text=True,
                       cwd=tmp_path, env=env_with_path(target, base={"PATH": "/usr/bin:/bin"}))
    assert r.returncode == 0, r.stderr
    assert "faster_rcnn" in r.stdout or "FasterRCNN" in r.stdout
