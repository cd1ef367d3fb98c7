"""infra/vault/bootstrap.py as a module, for the tests that drive it in process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "vault" / "bootstrap.py"


def load_bootstrap_script() -> ModuleType:
    """A fresh copy of the script, loaded by path: infra/ is not a package, and the script must
    stay runnable on its own."""
    spec = importlib.util.spec_from_file_location("ztbank_vault_bootstrap", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
