"""The ground floor: detkit.structures and detkit.errors import nothing from detkit, the former homes still re-export
the types, and every user-input error derives from the one base the entry points catch."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

import detkit

PACKAGE = Path(detkit.__file__).parent


def _detkit_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detkit"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("detkit")}
    return names


def test_ground_floor_imports_nothing_from_detkit():
    for name in ("structures.py", "errors.py"):
        assert _detkit_imports(PACKAGE / name) == set(), name


def test_types_keep_their_former_homes():
    from detkit import structures
    from detkit.data.collate import Targets, as_targets
    from detkit.models.detection.postprocess import Detections
    from detkit.models.detection.rpn import Proposals

    assert Targets is structures.Targets and as_targets is structures.as_targets
    assert Detections is structures.Detections and Proposals is structures.Proposals


def test_targets_pad_once_and_round_trip():
    from detkit.structures import Targets, as_targets

    t = Targets.from_list([{"boxes": [[0, 0, 4, 4]], "labels": [2], "image_id": 7, "orig_size": (10, 20), "scale": 0.5},
                           {"boxes": torch.zeros(0, 4), "labels": []}])
    assert t.boxes.shape == (2, 8, 4) and t.valid.sum() == 1 and t.image_ids.tolist() == [7, -1]
    assert t.image(0)["labels"].tolist() == [2] and len(t.image(1)["boxes"]) == 0
    assert as_targets(t, torch.device("cpu")) is not None and t.num_images == 2


def test_every_user_error_is_one_userror():
    from detkit.cli.common import MissingSettingError
    from detkit.config_check import ConfigKeyError
    from detkit.data.coco import CategoryMismatchError
    from detkit.data.image_files import ImageFolderError
    from detkit.data.validate import DatasetError, UnusableInputError
    from detkit.errors import USER_ERRORS, UserError
    from detkit.eval.coco_eval import PredictionError
    from detkit.export import ExportError
    from detkit.lit.divergence import TrainingDivergedError
    from detkit.models.backbones import EncoderLoadError

    for cls in (MissingSettingError, ConfigKeyError, CategoryMismatchError, ImageFolderError, DatasetError,
                UnusableInputError, PredictionError, ExportError, TrainingDivergedError, EncoderLoadError):
        assert issubclass(cls, UserError), cls
    assert UserError in USER_ERRORS and FileNotFoundError in USER_ERRORS


def test_resolvers_need_no_side_effect_import():
    """A fresh process composes the config tree and loads a saved run config without importing detkit.cli."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from detkit.paths import config_dir\n"
        "with initialize_config_dir(str(config_dir()), version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=study_bccd'])\n"
        "assert cfg.paths.data_dir and cfg.trainer.max_steps > 0\n"
        "assert not any(m.startswith('detkit.cli') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
