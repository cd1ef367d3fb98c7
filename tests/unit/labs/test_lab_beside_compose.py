"""What lets a lab run beside the compose stack as root: edits that keep a file's owner, the
files it edits and reads named by its settings, restarts told by process start times, and a
workload's SVID by that workload's uid."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.discovery.registry import ServiceAddress
from services.common.files import write_atomic
from services.common.identity.source import SvidUnavailableError
from services.labs.breaker import transitions
from services.labs.errors import LabError, LabUsageError
from services.labs.outage import run_outage_lab
from services.labs.support import FileBackup, unrestarted, watched_file
from services.stack.native import NativeStack, StackSettings, workload_svid
from services.stack.probe import metric_sample, metric_samples

SERVICE_UID, SERVICE_GID = 10001, 10000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")


def compose_settings(tmp_path: Path, uids: dict[str, int] | None = None) -> StackSettings:
    return StackSettings(
        home=tmp_path / "issuer",
        stack_kind="compose",
        service_home=str(tmp_path / "{service}"),
        policy=tmp_path / "live" / "policy.json",
        workload_uids=uids or {},
    )


@needs_root
def test_an_edit_and_its_undo_keep_the_owner_and_mode_of_the_file_a_service_reads(
    tmp_path: Path,
) -> None:
    settings = compose_settings(tmp_path)
    watched = tmp_path / "approle.json"
    watched.write_text('{"secret_id": "kept"}')
    os.chown(watched, SERVICE_UID, SERVICE_GID)
    watched.chmod(0o600)
    backup = FileBackup.of(watched, "upstream-approle")
    backup.save(settings)

    backup.replace(b'{"secret_id": "wrong"}')
    edited = watched.stat()
    assert (edited.st_uid, edited.st_gid, edited.st_mode & 0o777) == (
        SERVICE_UID,
        SERVICE_GID,
        0o600,
    )

    kept = FileBackup.load(settings, "upstream-approle")  # as a later run finds it
    assert kept is not None
    kept.restore(settings)
    restored = watched.stat()
    assert watched.read_text() == '{"secret_id": "kept"}'
    assert (restored.st_uid, restored.st_gid, restored.st_mode & 0o777) == (
        SERVICE_UID,
        SERVICE_GID,
        0o600,
    )


@needs_root
def test_write_atomic_gives_the_file_its_owner_before_it_appears(tmp_path: Path) -> None:
    target = tmp_path / "policy.json"
    write_atomic(target, b"{}", 0o644, owner=(SERVICE_UID, SERVICE_GID))
    assert (target.stat().st_uid, target.stat().st_gid) == (SERVICE_UID, SERVICE_GID)
    assert list(tmp_path.iterdir()) == [target]  # no temp file left


def test_beside_compose_the_watched_file_is_the_one_the_settings_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    settings = compose_settings(tmp_path)
    stack = NativeStack(settings)
    assert watched_file(stack, "ZTBANK_POLICY", settings.policy, "policy") == settings.policy

    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://consul:8500")
    with pytest.raises(LabError, match="reads its policy from Consul"):
        watched_file(stack, "ZTBANK_POLICY", settings.policy, "policy")


def test_each_service_home_is_its_volume_beside_compose_and_the_home_natively(
    tmp_path: Path,
) -> None:
    assert compose_settings(tmp_path).home_of("gateway") == tmp_path / "gateway"
    native = StackSettings(home=tmp_path / "var")
    assert native.home_of("gateway") == tmp_path / "var"


def test_beside_compose_a_workload_without_a_uid_gets_no_svid(tmp_path: Path) -> None:
    settings = compose_settings(tmp_path, {"ops": 10005})
    with pytest.raises(SvidUnavailableError, match="no uid for teller in ZTBANK_WORKLOAD_UIDS"):
        workload_svid(settings, "teller")


@pytest.mark.parametrize(
    ("before", "after", "same"),
    [
        ({"gateway": 1.5, "issuer": "t0"}, {"gateway": 1.5, "issuer": "t0"}, True),
        ({"gateway": 1.5}, {"gateway": 2.5}, False),
        ({"gateway": None}, {"gateway": None}, False),  # unknown proves nothing
    ],
)
def test_unrestarted_only_when_every_start_time_is_known_and_the_same(
    before: dict[str, object], after: dict[str, object], same: bool
) -> None:
    said: list[str] = []
    assert unrestarted(before, after, said.append, 7) is same
    assert said == [f"  7 {'no service was restarted' if same else 'a service was RESTARTED'}"]


METRICS = b"""# HELP breaker_transitions_total circuit breaker state transitions per target
# TYPE breaker_transitions_total counter
breaker_transitions_total{from="closed",target="transfer-engine",to="open"} 2.0
breaker_transitions_total{from="open",target="transfer-engine",to="half_open"} 1.0
breaker_transitions_total{from="closed",target="risk",to="open"} 5.0
breaker_transitions_total_created{from="closed",target="risk",to="open"} 1.7e+09
process_start_time_seconds 1.76530001234e+09
"""


@pytest.fixture
def metrics_port() -> Iterator[int]:
    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(METRICS)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_are_read_at_the_services_address_with_their_labels(metrics_port: int) -> None:
    gateway = ServiceAddress("gateway", "127.0.0.1", 8443, metrics_port)
    assert metric_sample(gateway, "process_start_time_seconds") == 1.76530001234e09
    assert len(metric_samples(gateway, "breaker_transitions_total")) == 3
    assert transitions(gateway) == {("closed", "open"): 2, ("open", "half_open"): 1}
    assert metric_samples(ServiceAddress("gateway", "127.0.0.1", 8443), "x") == []


def test_the_outage_lab_says_it_runs_on_the_native_stack_only(tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(LabUsageError, match="native stack only"):
        run_outage_lab(compose_settings(tmp_path), said.append)
    assert said == [
        "lab outage: the issuer stops; the bank serves, then fails closed, then recovers"
    ]
