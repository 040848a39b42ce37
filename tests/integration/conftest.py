"""End-to-end trainings: every test under tests/integration/ carries the ``integration`` marker (``make test`` runs
them; ``pytest -m 'not slow and not integration'`` leaves them out for a quicker run)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
