"""scripts/check_imports.py, which `make lint` runs: a circle of imports among the modules of
services/ fails, a lazy or relative import counts, one under TYPE_CHECKING does not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "check_imports.py"


def load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module
    spec.loader.exec_module(module)
    return module


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"services/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_lazy_import_that_closes_a_circle_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checker = load_checker()
    root = tree(
        tmp_path,
        {
            "services/cli/__init__.py": "",
            "services/cli/main.py": "from services.console import server\n",
            "services/console/__init__.py": "",
            "services/console/server.py": "def f():\n    from services.cli.main import g\n",
        },
    )
    assert checker.main([str(root)]) == 1
    assert "services.cli.main -> services.console.server -> services.cli.main" in (
        capsys.readouterr().err
    )


def test_type_checking_imports_and_generated_code_do_not_count(tmp_path: Path) -> None:
    checker = load_checker()
    root = tree(
        tmp_path,
        {
            "services/a.py": "from services import b\n",
            "services/b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services import a\n"
            ),
            "services/_proto/__init__.py": "",
            "services/_proto/x.py": "from services._proto import y\n",
            "services/_proto/y.py": "from services._proto import x\n",
        },
    )
    assert checker.main([str(root)]) == 0


def test_a_relative_import_is_resolved(tmp_path: Path) -> None:
    checker = load_checker()
    root = tree(
        tmp_path,
        {
            "services/pkg/__init__.py": "",
            "services/pkg/one.py": "from . import two\n",
            "services/pkg/two.py": "from .one import x\n",
        },
    )
    assert checker.main([str(root)]) == 1
