"""Where detkit's Hydra config tree lives, for source checkouts, editable and regular installs."""

from __future__ import annotations

from pathlib import Path

from detkit.run_config import register_resolvers

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """Return the directory that holds ``train.yaml``, ``pretrain.yaml`` and the config groups.

    A regular ``pip install .`` ships the repository's ``conf/`` inside the package as ``detkit/conf``; a source
    checkout or an editable install reads ``conf/`` beside the package directly. The tree's resolvers
    (``${detkit_data:}``, ``${detkit_mul:}``) are registered here, where every entry point finds the tree to compose.
    """
    register_resolvers()
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"detkit's config tree was not found next to {_PACKAGE_DIR}: reinstall detkit (pip install .) "
        "or run from a source checkout that has conf/."
    )
