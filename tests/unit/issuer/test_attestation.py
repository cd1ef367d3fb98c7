import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.issuer.adapters.attestation import (
    PeerCredentials,
    peer_credentials,
    peer_pidfd,
    workload_selectors,
)
from services.issuer.domain.entries import Selector

Peer = tuple[PeerCredentials, int | None]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        yield left, right


@pytest.fixture
def ourselves(pair: tuple[socket.socket, socket.socket]) -> Iterator[Peer]:
    """Our own process, as the issuer sees a peer: kernel credentials and a pidfd."""
    creds = peer_credentials(pair[0])
    pidfd = peer_pidfd(pair[0], creds.pid)
    assert pidfd is not None
    yield creds, pidfd
    os.close(pidfd)


def paths(selectors: frozenset[Selector]) -> set[str]:
    return {s.value for s in selectors if (s.type, s.key) == ("unix", "path")}


def test_peer_credentials_are_the_connecting_process(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    for end in pair:
        assert peer_credentials(end) == PeerCredentials(os.getpid(), os.getuid(), os.getgid())


def test_selectors_describe_our_process(ourselves: Peer) -> None:
    selectors = workload_selectors(*ourselves[:1], None, ourselves[1])
    assert Selector("unix", "uid", str(os.getuid())) in selectors
    assert Selector("unix", "gid", str(os.getgid())) in selectors
    assert paths(selectors) == {os.readlink("/proc/self/exe")}
    assert {s for s in selectors if (s.type, s.key) == ("unix", "uid")} == {
        Selector("unix", "uid", str(os.getuid()))
    }


def test_selectors_include_supplementary_groups(ourselves: Peer) -> None:
    selectors = workload_selectors(ourselves[0], None, ourselves[1])
    gids = {s.value for s in selectors if (s.type, s.key) == ("unix", "gid")}
    assert gids == {str(g) for g in {os.getgid(), *os.getgroups()}}


def test_no_socket_selector_without_a_socket_name(ourselves: Peer) -> None:
    selectors = workload_selectors(ourselves[0], None, ourselves[1])
    assert not any(s.type == "ztbank" for s in selectors)


def test_socket_selector_names_the_socket(ourselves: Peer) -> None:
    selectors = workload_selectors(ourselves[0], "ledger", ourselves[1])
    assert [s for s in selectors if s.type == "ztbank"] == [Selector("ztbank", "socket", "ledger")]


def test_selectors_match_what_an_operator_registers(ourselves: Peer) -> None:
    selectors = workload_selectors(ourselves[0], "ledger", ourselves[1])
    registered = {
        Selector.parse(f"unix:uid:{os.getuid()}"),
        Selector.parse(f"unix:path:{os.readlink('/proc/self/exe')}"),
        Selector.parse("ztbank:socket:ledger"),
    }
    assert registered <= selectors


def test_process_without_pidfd_gets_only_kernel_facts() -> None:
    selectors = workload_selectors(PeerCredentials(os.getpid(), 1234, 5678), None, None)
    assert selectors == frozenset(
        {Selector("unix", "uid", "1234"), Selector("unix", "gid", "5678")}
    )


def _exited_peer(tmp_path: Path) -> tuple[socket.socket, PeerCredentials]:
    """A child that connected to our socket and has exited (and been reaped) since."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "s"))
    listener.listen()
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({str(tmp_path / 's')!r})"
    subprocess.run([sys.executable, "-c", connect], check=True, timeout=30)
    connection, _ = listener.accept()
    listener.close()
    return connection, peer_credentials(connection)


def test_a_peer_that_has_exited_lends_no_proc_facts(tmp_path: Path) -> None:
    connection, creds = _exited_peer(tmp_path)
    with connection:
        pidfd = peer_pidfd(connection, creds.pid)
        try:
            selectors = workload_selectors(creds, None, pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    assert paths(selectors) == set()
    assert selectors == frozenset(
        {Selector("unix", "uid", str(creds.uid)), Selector("unix", "gid", str(creds.gid))}
    )


def test_a_reused_pid_does_not_lend_its_executable() -> None:
    """The peer exited and its pid now names another process (here: ``sleep``)."""
    peer = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(peer.pid)  # what the issuer took when the peer connected
    peer.wait()
    other = subprocess.Popen(["sleep", "30"])
    other_pidfd = os.pidfd_open(other.pid)
    try:
        reused = PeerCredentials(other.pid, os.getuid(), os.getgid())
        assert paths(workload_selectors(reused, None, pidfd)) == set()
        # The same /proc entry is offered while the pidfd proves it is the peer's:
        assert paths(workload_selectors(reused, None, other_pidfd)) == {
            os.readlink(f"/proc/{other.pid}/exe")
        }
    finally:
        os.close(pidfd)
        os.close(other_pidfd)
        other.kill()
        other.wait()
