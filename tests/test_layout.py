"""The repository's layout as packaging and the import contracts see it: `passes/` and
`models/` live at the top level, install as `mtcompile.passes` / `mtcompile.models`, and the
links under `mtcompile/` show them there to import-linter."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _moved_packages() -> dict[str, str]:
    """Subpackages of mtcompile whose folder is elsewhere (package-dir): name -> folder."""
    table = CONFIG["tool"]["setuptools"]["package-dir"]
    return {name: folder for name, folder in table.items() if name != "mtcompile"}


def test_moved_packages_are_the_top_level_folders():
    assert _moved_packages() == {"mtcompile.passes": "passes", "mtcompile.models": "models"}


@pytest.mark.parametrize("name,folder", sorted(_moved_packages().items()))
def test_a_link_under_mtcompile_shows_each_moved_package(name, folder):
    link = ROOT / name.replace(".", "/")
    assert link.is_symlink(), f"{link} should link to ../{folder} (import-linter reads it)"
    assert link.resolve() == (ROOT / folder).resolve()


def test_import_graph_holds_passes_and_models_under_their_installed_names():
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(ROOT))  # as lint-imports does: the checkout's files, not an install
    try:
        graph = grimp.build_graph("mtcompile", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    for name in ("mtcompile.passes.dedup", "mtcompile.models.zoo"):
        assert name in graph.modules
    assert "mtcompile.passes" in graph.find_modules_directly_imported_by("mtcompile.api")
    assert CONFIG["tool"]["importlinter"]["root_packages"] == ["mtcompile"]
