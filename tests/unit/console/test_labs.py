"""Labs run from the console: one at a time, narrated line by line, secrets kept off the page."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.console.errors import LabBusyError, UnknownLabError
from services.console.labs import LabRunner, Redactor

LABS = {"quick": "prints and passes", "failing": "prints and fails", "slow": "takes a while"}
SCRIPTS = {
    "quick": "print('lab quick: step 1'); print('lab passed: all good')",
    "failing": "print('lab failing: step 1'); print('lab failed: see above'); raise SystemExit(1)",
    "slow": "import time; print('started', flush=True); time.sleep(30)",
    # Prints a token and the private key PEM named by its argument (made by the test).
    "leaky": (
        "import sys; print('token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl issued');"
        "print(open(sys.argv[1]).read(), end=''); print('done')"
    ),
}


def command(name: str, *args: str) -> Sequence[str]:
    return [sys.executable, "-c", SCRIPTS[name], *args]


def private_key_pem() -> str:
    """A fresh key, made at run time: no key material lives in the repository."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class Published:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        self.events.append((event, data))


def runner(
    published: Published, *, timeout: float = 30.0, key_file: Path | None = None
) -> LabRunner:
    extra = (str(key_file),) if key_file else ()
    return LabRunner(
        {**LABS, "leaky": "prints secrets"},
        {},
        published,
        command=lambda name: command(name, *extra),
        timeout=timeout,
    )


def test_a_lab_is_narrated_line_by_line_and_ends_with_its_verdict() -> None:
    published = Published()

    async def scenario() -> None:
        labs = runner(published)
        run = await labs.start("quick")
        assert run.verdict is None
        await labs.wait()
        assert run.lines == ["lab quick: step 1", "lab passed: all good"]
        assert run.exit_code == 0
        assert run.document()["verdict"] == "passed"

    asyncio.run(scenario())
    lines = [data["line"] for event, data in published.events if event == "lab_line"]
    assert lines == ["lab quick: step 1", "lab passed: all good"]
    assert published.events[0][0] == "lab"
    assert published.events[0][1]["verdict"] is None
    assert published.events[-1] == ("lab", published.events[-1][1])
    assert published.events[-1][1]["verdict"] == "passed"


def test_a_failing_lab_is_reported_failed() -> None:
    async def scenario() -> str | None:
        labs = runner(Published())
        run = await labs.start("failing")
        await labs.wait()
        return run.verdict

    assert asyncio.run(scenario()) == "failed"


def test_one_lab_at_a_time_and_unknown_names_are_refused() -> None:
    async def scenario() -> None:
        labs = runner(Published())
        with pytest.raises(UnknownLabError, match="no lab 'nope'; the labs are: failing,"):
            await labs.start("nope")
        await labs.start("slow")
        with pytest.raises(LabBusyError, match="lab 'slow' is running"):
            await labs.start("quick")
        assert labs.last is not None
        assert labs.last.name == "slow"  # the refused start changed nothing
        await labs.aclose()
        assert labs.running is None

    asyncio.run(scenario())


def test_a_lab_that_overruns_is_stopped_and_failed() -> None:
    async def scenario() -> None:
        labs = runner(Published(), timeout=0.5)
        run = await labs.start("slow")
        await labs.wait()
        assert run.verdict == "failed"
        assert run.lines[-1] == "lab stopped: it did not end within 0.5 s"

    asyncio.run(scenario())


def test_tokens_and_private_keys_never_reach_the_page(tmp_path: Path) -> None:
    published = Published()
    pem = private_key_pem()
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem)
    key_file.chmod(0o600)

    async def scenario() -> list[str]:
        labs = runner(published, key_file=key_file)
        run = await labs.start("leaky")
        await labs.wait()
        return run.lines

    lines = asyncio.run(scenario())
    assert lines == ["token <token> issued", "<private key hidden>", "done"]
    sent = repr(published.events)
    assert "eyJ" not in sent
    assert all(line not in sent for line in pem.splitlines()[1:-1])  # no line of the key


def test_the_redactor_hides_a_key_block_in_one_line_too() -> None:
    redact = Redactor()
    assert redact(" ".join(private_key_pem().split())) == "<private key hidden>"
    assert redact("next line") == "next line"
