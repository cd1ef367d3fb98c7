"""The issuer's admin API can mint any identity of the trust domain, so it has two locks: its
socket is 0600 in a 0700 directory, owned by the issuer's uid, and a caller of another uid that
reaches it anyway (a loosened mode) is refused by the uid check, logged and audited.  Switching
uid needs root; CI runs as root."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from services._proto import issuer_admin_pb2 as pb
from services.issuer.admin_client import AdminCallError, call_admin
from services.issuer.harness import IssuerProcess
from services.issuer.transport.admin_api import ADMIN_REFUSAL
from tests.integration.conftest import TRUST_DOMAIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")

STRANGER_UID, GROUP = 10009, 10000
TELLER = f"spiffe://{TRUST_DOMAIN}/env/prod/zone/az1/team/channels/svc/teller"


def as_uid(uid: int, call: Callable[[], object]) -> str:
    """``call()`` in a forked child running as ``uid``: "ok", or the AdminCallError it got."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(GROUP)
            os.setuid(uid)
            try:
                call()
                answer = "ok"
            except AdminCallError as error:
                answer = f"refused: {error}"
            except BaseException as error:
                answer = f"unexpected: {error!r}"
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def mint(socket: Path) -> Callable[[], object]:
    request = pb.MintX509SVIDRequest(spiffe_id=TELLER, ttl_seconds=60)
    return lambda: call_admin(socket, lambda stub: stub.MintX509SVID(request))


def test_the_admin_socket_is_the_issuers_alone_and_shuts_other_uids_out(
    issuer: IssuerProcess,
) -> None:
    socket = issuer.admin_socket
    status = socket.stat()
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert status.st_uid == os.getuid()
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700

    answer = as_uid(STRANGER_UID, mint(socket))

    assert answer.startswith("refused: cannot reach the issuer at"), answer
    assert "Permission denied" in answer
    assert call_admin(socket, lambda stub: stub.Status(pb.StatusRequest())).entries == 0


def test_another_uid_that_reaches_the_socket_is_refused_minting_logged_and_audited(
    issuer: IssuerProcess,
) -> None:
    socket = issuer.admin_socket
    # A loosened mode (an operator's mistake): the uid check is all that is left.
    for directory in (issuer.home.parent, issuer.home, socket.parent.parent, socket.parent):
        directory.chmod(0o755)
    socket.chmod(0o666)

    answer = as_uid(STRANGER_UID, mint(socket))

    assert answer == f"refused: issuer refused: {ADMIN_REFUSAL}", answer
    audit = issuer.home / "audit" / "issuer-admin.jsonl"
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (record["event"], record["decision"]) == ("admin", "deny")
    assert record["method"] == "admin MintX509SVID"
    assert record["source_addr"] == f"uid:{STRANGER_UID}"
    assert record["reason"].startswith(f"{ADMIN_REFUSAL}: uid {STRANGER_UID} (pid ")
    assert f"admin API refused MintX509SVID: {ADMIN_REFUSAL}" in issuer.log()
    # The issuer's own user is still served.
    assert call_admin(socket, lambda stub: stub.Status(pb.StatusRequest())).upstream == "disk"
