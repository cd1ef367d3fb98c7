"""The console's HTTP API: the page and its files, lab starts (audited, refused with
problem+json), load reports; a fake stack stands in for a running one."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.authz.audit import AuditLog
from services.common.identity.source import SvidMaterial
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.console.app import ACTION_HEADER, Broadcaster, Console, create_console_app, sse
from services.console.settings import ConsoleSettings
from tests.support.mtls_servers import TD, new_authority

CONSOLE_ID = f"spiffe://{TD}/env/prod/zone/az1/team/platform/svc/console"
START = {ACTION_HEADER: "start"}


class FakeStack:
    def __init__(self, identity: SvidMaterial) -> None:
        self.up = True
        self.probe_seconds = 0.0  # how long a snapshot takes (a real one probes over mTLS)
        self._identity = identity

    def snapshot(self) -> dict[str, Any]:
        time.sleep(self.probe_seconds)
        return {
            "taken": time.time(),
            "up": self.up,
            "start_hint": None if self.up else "is the stack up? (looked in ZTBANK_HOME=/x)",
            "start_command": "make up",
            "console": {"spiffe_id": CONSOLE_ID, "svid_serial": self._identity.serial},
            "stack": {"trust_domain": TD, "services": {}},
            "revoked": [],
            "crl_error": None,
        }

    def identity(self) -> SvidMaterial | None:
        return self._identity


def lab_command(name: str) -> Sequence[str]:
    return [sys.executable, "-c", "import time; print('lab step 1', flush=True); time.sleep(20)"]


@pytest.fixture
def identity() -> SvidMaterial:
    return new_authority("console test").svid(CONSOLE_ID)


@pytest.fixture
def stack(identity: SvidMaterial) -> FakeStack:
    return FakeStack(identity)


@pytest.fixture
def settings(tmp_path: Path) -> ConsoleSettings:
    return ConsoleSettings(home=tmp_path / "var", console_port=8190)


@pytest.fixture
def client(settings: ConsoleSettings, stack: FakeStack) -> Iterator[TestClient]:
    audit = AuditLog(settings.home / "audit" / "console.jsonl", fsync=False)
    console = Console(
        settings,
        stack,
        audit,
        {"revocation": "revoke a client", "rotation": "watch rotation"},
        {},
        lab_command=lab_command,
    )
    with TestClient(create_console_app(console), base_url="http://127.0.0.1:8190") as test:
        yield test
    audit.close()


def audit_records(settings: ConsoleSettings) -> list[dict[str, Any]]:
    path = settings.home / "audit" / "console.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_problem(reply: Any, status: int, detail_part: str) -> None:
    assert reply.status_code == status
    assert reply.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body = reply.json()
    assert body["status"] == status
    assert detail_part in body["detail"]


def test_the_page_and_its_chart_library_are_served_locally(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in ("/static/console.js", "/static/vendor/uplot/uPlot.iife.min.js"):
        assert f'src="{path}"' in page.text
        assert client.get(path).status_code == 200
    assert "https://" not in page.text  # nothing from a CDN: the page works offline


def test_a_lab_start_is_audited_with_the_consoles_own_identity(
    client: TestClient, settings: ConsoleSettings, identity: SvidMaterial
) -> None:
    reply = client.post("/api/labs/revocation", headers=START)
    assert reply.status_code == 202
    assert reply.json()["lab"] == "revocation"
    [record] = audit_records(settings)
    assert record["caller_spiffe_id"] == CONSOLE_ID
    assert record["cert_serial"] == identity.serial
    assert (record["service"], record["method"]) == ("console", "POST /api/labs/revocation")
    assert (record["decision"], record["reason"]) == (
        "allow",
        "lab revocation started from the console",
    )


def test_a_second_lab_while_one_runs_is_refused_and_audited(
    client: TestClient, settings: ConsoleSettings
) -> None:
    assert client.post("/api/labs/revocation", headers=START).status_code == 202
    reply = client.post("/api/labs/rotation", headers=START)
    assert_problem(reply, 409, "lab 'revocation' is running")
    assert client.get("/api/labs").json()["running"] is True
    assert [r["decision"] for r in audit_records(settings)] == ["allow", "deny"]


def test_a_double_click_starts_one_lab_and_the_second_start_is_refused_and_audited(
    client: TestClient, stack: FakeStack, settings: ConsoleSettings
) -> None:
    # Both requests arrive while the first one still probes the stack: the second must not pass
    # the check and be audited as allowed before the first one's lab runs.
    stack.probe_seconds = 0.3
    with ThreadPoolExecutor(2) as pool:
        replies = list(
            pool.map(lambda _: client.post("/api/labs/revocation", headers=START), range(2))
        )
    assert sorted(r.status_code for r in replies) == [202, 409]
    assert_problem(
        next(r for r in replies if r.status_code == 409), 409, "lab 'revocation' is running"
    )
    assert [r["decision"] for r in audit_records(settings)] == ["allow", "deny"]


def test_an_unknown_lab_is_a_404_naming_the_labs(
    client: TestClient, settings: ConsoleSettings
) -> None:
    assert_problem(
        client.post("/api/labs/nope", headers=START),
        404,
        "there is no lab 'nope'; the labs are: revocation, rotation",
    )
    [record] = audit_records(settings)
    assert (record["decision"], record["method"]) == ("deny", "POST /api/labs/nope")


def test_no_lab_starts_while_the_stack_is_down(
    client: TestClient, stack: FakeStack, settings: ConsoleSettings
) -> None:
    stack.up = False
    reply = client.post("/api/labs/revocation", headers=START)
    assert_problem(reply, 503, "the stack is down: start it with `make up`")
    assert client.get("/api/labs").json()["running"] is False


def test_a_lab_start_without_the_console_header_is_refused(client: TestClient) -> None:
    # A form on another site can POST here, but cannot add a header: no lab starts.
    reply = client.post("/api/labs/revocation")
    assert_problem(reply, 403, "x-ztbank-console")
    assert client.get("/api/labs").json()["running"] is False


def test_requests_naming_another_host_are_refused(client: TestClient) -> None:
    # DNS rebinding: a name that resolves to 127.0.0.1 but is not ours.
    assert client.get("/api/state", headers={"host": "attacker.example"}).status_code == 400


def test_load_reports_are_listed_and_only_they_are_served(
    client: TestClient, settings: ConsoleSettings
) -> None:
    load = settings.home / "load"
    load.mkdir(parents=True)
    (load / "mixed-20261204T100000.html").write_text("<html>report</html>")
    (load / "mixed_stats.csv").write_text("not a report")
    listed = client.get("/api/reports").json()["reports"]
    assert [r["name"] for r in listed] == ["mixed-20261204T100000.html"]
    assert client.get(listed[0]["url"]).text == "<html>report</html>"
    assert_problem(client.get("/reports/mixed_stats.csv"), 404, "no load report")
    assert client.get("/reports/..%2Faudit%2Fconsole.jsonl").status_code == 404


def test_closing_the_broadcaster_ends_every_open_stream() -> None:
    # At shutdown: each page's stream ends (its EventSource reconnects to the next console)
    # even one whose queue is full, instead of being held open until the server cuts it.
    async def scenario() -> list[list[str | None]]:
        events = Broadcaster()
        with events.subscribe() as idle, events.subscribe() as full:
            events.publish("state", {"n": 1})
            while not full.full():
                full.put_nowait("backlog")
            events.close()
            events.publish("state", {"n": 2})  # nobody listens any more
            drained = []
            for queue in (idle, full):
                items = []
                while not queue.empty():
                    items.append(queue.get_nowait())
                drained.append(items)
            return drained

    idle, full = asyncio.run(scenario())
    assert idle == [sse("state", {"n": 1}), None]
    assert full[-1] is None


def test_the_feed_is_one_timeline_across_the_services_audit_files(
    settings: ConsoleSettings, stack: FakeStack
) -> None:
    audit = settings.home / "audit"
    audit.mkdir(parents=True)
    lines = {
        "gateway": ["2026-12-04T10:00:00.100+00:00", "2026-12-04T10:00:00.300+00:00"],
        "risk": ["2026-12-04T10:00:00.200+00:00"],
        "transfer-engine": ["2026-12-04T10:00:00.050+00:00"],
    }
    for service, times in lines.items():
        (audit / f"{service}.jsonl").write_text(
            "".join(json.dumps({"time": t, "service": service}) + "\n" for t in times)
        )
    log = AuditLog(audit / "console.jsonl", fsync=False)
    try:
        console = Console(settings, stack, log, {}, {})
        feed = [(d["time"][20:23], d["service"]) for d in console.read_decisions()]
    finally:
        log.close()
    assert feed == [
        ("050", "transfer-engine"),
        ("100", "gateway"),
        ("200", "risk"),
        ("300", "gateway"),
    ]
