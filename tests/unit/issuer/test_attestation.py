import os
import socket
from collections.abc import Iterator

import pytest

from services.issuer.adapters.attestation import (
    PeerCredentials,
    peer_credentials,
    workload_selectors,
)
from services.issuer.domain.entries import Selector


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        yield left, right


def test_peer_credentials_are_the_connecting_process(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    for end in pair:
        assert peer_credentials(end) == PeerCredentials(os.getpid(), os.getuid(), os.getgid())


def test_selectors_describe_our_process(pair: tuple[socket.socket, socket.socket]) -> None:
    selectors = workload_selectors(peer_credentials(pair[0]), None)
    assert Selector("unix", "uid", str(os.getuid())) in selectors
    assert Selector("unix", "gid", str(os.getgid())) in selectors
    assert Selector("unix", "path", os.readlink("/proc/self/exe")) in selectors
    assert {s for s in selectors if (s.type, s.key) == ("unix", "path")} == {
        Selector("unix", "path", os.readlink("/proc/self/exe"))
    }
    assert {s for s in selectors if (s.type, s.key) == ("unix", "uid")} == {
        Selector("unix", "uid", str(os.getuid()))
    }


def test_selectors_include_supplementary_groups(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    selectors = workload_selectors(peer_credentials(pair[0]), None)
    gids = {s.value for s in selectors if (s.type, s.key) == ("unix", "gid")}
    assert gids == {str(g) for g in {os.getgid(), *os.getgroups()}}


def test_no_socket_selector_without_a_socket_name(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    selectors = workload_selectors(peer_credentials(pair[0]), None)
    assert not any(s.type == "ztbank" for s in selectors)


def test_socket_selector_names_the_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    selectors = workload_selectors(peer_credentials(pair[0]), "ledger")
    assert [s for s in selectors if s.type == "ztbank"] == [Selector("ztbank", "socket", "ledger")]


def test_selectors_match_what_an_operator_registers(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    selectors = workload_selectors(peer_credentials(pair[0]), "ledger")
    registered = {
        Selector.parse(f"unix:uid:{os.getuid()}"),
        Selector.parse(f"unix:path:{os.readlink('/proc/self/exe')}"),
        Selector.parse("ztbank:socket:ledger"),
    }
    assert registered <= selectors


def test_process_without_proc_entry_gets_only_kernel_facts() -> None:
    # pid 0 never has a /proc entry: no executable path, no supplementary groups.
    selectors = workload_selectors(PeerCredentials(0, 1234, 5678), None)
    assert selectors == frozenset(
        {Selector("unix", "uid", "1234"), Selector("unix", "gid", "5678")}
    )
