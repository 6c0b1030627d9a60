"""The package's layers, as `scripts/import_graph.py` reads them from the source: the core imports
no server, tool or concrete proposer, and no modules import each other at module level."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.scripts import load_script

# What verispec.core may not import at any level. The core drives proposers through their
# protocol (`verispec.proposers.base`) only.
NOT_FROM_CORE = (
    "verispec.server",
    "verispec.tools",
    "verispec.proposers.draft",
    "verispec.proposers.ngram",
    "verispec.proposers.remote",
)


@pytest.fixture(scope="module")
def import_graph():
    return load_script("import_graph")


@pytest.fixture(scope="module")
def graph(import_graph):
    return import_graph.graph()


def test_the_core_imports_no_server_tool_or_concrete_proposer(graph):
    found = [
        str(imp)
        for imp in graph.imports
        if imp.source.startswith("verispec.core.")
        and any(imp.target == name or imp.target.startswith(name + ".") for name in NOT_FROM_CORE)
    ]
    assert found == []


def test_no_module_level_import_cycles(import_graph, graph):
    assert [str(cycle) for cycle in import_graph.module_level_cycles(graph)] == []


def test_every_module_has_a_layer_and_none_imports_upward(import_graph, graph):
    assert import_graph.unplaced(graph) == []
    assert [str(imp) for imp in import_graph.upward(graph)] == []


def test_no_function_level_import_cycles(import_graph, graph):
    assert [str(cycle) for cycle in import_graph.function_level_cycles(graph)] == []


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "verispec" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_analysis_on_a_package_of_its_own(import_graph, tmp_path):
    """Relative and absolute imports resolve to modules, TYPE_CHECKING imports do not count, a
    function's imports count apart, and a lower layer importing a higher one is an upward arrow."""
    _package(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "from .text import clean\n",
            "text.py": "from verispec import errors\n",  # a module-level cycle with errors.py
            "config/__init__.py": """
                from typing import TYPE_CHECKING

                from verispec.config.values import Depth

                if TYPE_CHECKING:
                    from verispec.core.engine import Engine  # not counted
            """,
            "config/values.py": """
                def load():
                    from verispec.config import Depth  # closes a cycle, in a function
            """,
            "core/__init__.py": "",
            "core/engine.py": """
                import verispec.models.backend

                def serve():
                    from verispec.server.app import app  # upward, in a function
            """,
            "models/__init__.py": "",
            "models/backend.py": "from verispec.core import engine  # upward, module level\n",
            "server/__init__.py": "",
            "server/app.py": "from ..core.engine import serve\n",
            "mystery.py": "",
        },
    )
    g = import_graph.graph(tmp_path)
    arrows = {(i.source, i.target, i.function_level) for i in g.imports}
    assert arrows == {
        ("verispec.errors", "verispec.text", False),
        ("verispec.text", "verispec.errors", False),
        ("verispec.config", "verispec.config.values", False),
        ("verispec.config.values", "verispec.config", True),
        ("verispec.core.engine", "verispec.models.backend", False),
        ("verispec.core.engine", "verispec.server.app", True),
        ("verispec.models.backend", "verispec.core.engine", False),
        ("verispec.server.app", "verispec.core.engine", False),
    }
    assert [c.modules for c in import_graph.module_level_cycles(g)] == [
        ["verispec.core.engine", "verispec.models.backend"],
        ["verispec.errors", "verispec.text"],
    ]
    function_cycles = import_graph.function_level_cycles(g)
    assert [c.modules for c in function_cycles] == [
        ["verispec.config", "verispec.config.values"],
        ["verispec.core.engine", "verispec.models.backend", "verispec.server.app"],
    ]
    assert function_cycles[0].example == [
        "verispec.config.values",
        "verispec.config",
        "verispec.config.values",
    ]
    assert [(i.source, i.target) for i in function_cycles[1].imports] == [
        ("verispec.core.engine", "verispec.server.app")
    ]
    assert {(i.source, i.target, i.function_level) for i in import_graph.upward(g)} == {
        ("verispec.core.engine", "verispec.server.app", True),
        ("verispec.models.backend", "verispec.core.engine", False),
    }
    assert import_graph.unplaced(g) == ["verispec.mystery"]
    lines, ok = import_graph.report(g)
    assert not ok and lines[-1] == "FAILED"
    assert "verispec/models/backend.py:1: verispec.models.backend imports verispec.core.engine" in "\n".join(
        lines
    )


def test_function_level_cycles_alone_fail_only_without_the_allowance(import_graph, tmp_path):
    _package(
        tmp_path,
        {
            "__init__.py": "",
            "text.py": "def f():\n    from verispec.stats import g\n",
            "stats.py": "from verispec.text import f\n",
        },
    )
    g = import_graph.graph(tmp_path)
    assert not import_graph.report(g)[1]
    assert import_graph.report(g, allow_function_level=True)[1]
