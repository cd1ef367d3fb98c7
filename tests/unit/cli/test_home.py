"""Which stack the CLI talks to when run from any directory (issue 11, item 7)."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main as cli
from services.common.polling import poll_until
from services.common.settings import ZtbankSettings
from services.stack.native import CHECKOUT, ISSUER_MODULE, StackSettings, locate_settings
from tests.support.helpers import scrub_environment

ZTBANK = Path(sys.executable).with_name("ztbank")


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the caller's ZTBANK_* (or other leaky) variables."""
    scrub_environment(monkeypatch)


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A process whose command line names the issuer's module, as a running issuer's does."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", ISSUER_MODULE])
    try:
        # Until its exec completes, the child's command line is still pytest's: wait for the
        # evidence, not for a while.
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        named = poll_until(lambda: ISSUER_MODULE.encode() in cmdline.read_bytes(), timeout=10)
        assert named, "the sleeper never showed the issuer's module in its command line"
        yield process.pid
    finally:
        process.kill()
        process.wait()


def checkout(root: Path) -> Path:
    """A directory that looks like a ztbank checkout (it has infra/registry.json)."""
    (root / "infra").mkdir(parents=True)
    (root / "infra" / "registry.json").write_text('{"services": []}')
    return root


def run_stack(root: Path, pid: int) -> None:
    """Make ``root/var`` look like the home of a running native stack."""
    pids = root / "var" / "run" / "pids"
    pids.mkdir(parents=True)
    (pids / "issuer.pid").write_text(f"{pid}\n")


def test_the_installed_checkout_with_a_running_stack_is_found_from_elsewhere(
    tmp_path: Path, sleeper: int
) -> None:
    installed = checkout(tmp_path / "repo")
    run_stack(installed, sleeper)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    settings = locate_settings(StackSettings, cwd=elsewhere, checkout=installed)

    assert settings.home == installed / "var"
    assert settings.certs_dir == installed / "certs"
    assert settings.registry == installed / "infra" / "registry.json"
    assert settings.policy == installed / "infra" / "policy.json"
    assert settings.risk_rules == installed / "infra" / "risk" / "rules.json"


def test_a_stack_running_in_the_current_directory_wins(tmp_path: Path, sleeper: int) -> None:
    installed = checkout(tmp_path / "repo")
    run_stack(installed, sleeper)
    here = tmp_path / "other-checkout"
    run_stack(here, sleeper)

    assert locate_settings(StackSettings, cwd=here, checkout=installed).home == here / "var"


def test_without_a_running_stack_the_installed_checkout_is_used_outside_a_checkout(
    tmp_path: Path,
) -> None:
    installed = checkout(tmp_path / "repo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    assert locate_settings(StackSettings, cwd=elsewhere, checkout=installed).home == (
        installed / "var"
    )
    # Inside a checkout, that checkout: `ztbank up` there starts its own stack, as it always did.
    here = checkout(tmp_path / "clone")
    assert locate_settings(StackSettings, cwd=here, checkout=installed).home == here / "var"
    # Neither a checkout (an installed wheel): the current directory, as before.
    nowhere = tmp_path / "site-packages"
    assert locate_settings(StackSettings, cwd=elsewhere, checkout=nowhere).home == (
        elsewhere / "var"
    )


def test_a_pid_file_naming_another_process_is_no_running_stack(tmp_path: Path) -> None:
    installed = checkout(tmp_path / "repo")
    here = checkout(tmp_path / "clone")
    run_stack(installed, os.getpid())  # alive, but not an issuer (a stale pid reused)

    assert locate_settings(StackSettings, cwd=here, checkout=installed).home == here / "var"


def test_explicit_settings_win(
    tmp_path: Path, sleeper: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = checkout(tmp_path / "repo")
    run_stack(installed, sleeper)
    monkeypatch.setenv("ZTBANK_REGISTRY", str(tmp_path / "mine.json"))

    settings = locate_settings(StackSettings, cwd=tmp_path, checkout=installed)
    assert settings.registry == tmp_path / "mine.json"
    assert settings.home == installed / "var"

    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    base = locate_settings(ZtbankSettings, cwd=tmp_path, checkout=installed)
    assert base.home == tmp_path / "home"
    assert base.certs_dir == tmp_path / "certs"  # relative to the current directory


def test_login_without_a_stack_names_the_home_it_looked_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    installed = checkout(tmp_path / "repo")
    monkeypatch.setattr("services.stack.native.CHECKOUT", installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code = cli.main(["login", "alice"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert f"looked in ZTBANK_HOME={installed / 'var'}" in err
    assert "make up" in err


def _ztbank(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ZTBANK), *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ztbank_run_from_a_temp_directory_uses_the_installed_checkout(tmp_path: Path) -> None:
    """The real command from outside the checkout: it reports the checkout's stack (running or
    not), not ./var of the temp directory."""
    result = _ztbank("status", "--json", cwd=tmp_path)

    document = json.loads(result.stdout)
    assert document["root_ca"] == str(CHECKOUT / "certs" / "root-ca.pem")
    assert document["issuer"]["socket"] == f"unix://{CHECKOUT / 'var' / 'run' / 'workload.sock'}"
    assert not (tmp_path / "var").exists()


def test_ztbank_login_with_an_empty_home_names_it_and_the_variable(tmp_path: Path) -> None:
    result = _ztbank("login", "alice", cwd=tmp_path, ZTBANK_HOME=str(tmp_path / "nothing"))

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"looked in ZTBANK_HOME={tmp_path / 'nothing'}" in result.stderr
