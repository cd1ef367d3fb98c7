"""``python -m services.<name>``: a service that cannot start says why in one line and exits 2."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from services.common.discovery.registry import FileRegistry, write_registry
from services.stack.sandbox import free_port, sandbox_stack
from tests.support.helpers import clean_environment, one_line, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("services.gateway", "gateway"),
        ("services.transfer_engine", "transfer-engine"),
        ("services.risk", "risk"),
    ],
)
def test_invalid_settings_stop_the_service_with_one_line_and_exit_2(module: str, name: str) -> None:
    env = clean_environment() | {"ZTBANK_TRUST_DOMAIN": "Not A Domain!"}
    done = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"{name}: invalid setting ZTBANK_TRUST_DOMAIN: "), line


# The gateway's serving loop with a stand-in app and engine channel (no identity needed).
_GATEWAY_UNTIL_SIGTERM = """
import pathlib, sys, uvicorn
from services.common.runtime.health import ServiceHealth
from services.gateway.server import Gateway

closed = pathlib.Path(sys.argv[2])

class EngineChannel:
    async def aclose(self) -> None:
        closed.write_text("closed")

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off")
Gateway(uvicorn.Server(config), EngineChannel(), ServiceHealth("gateway")).run()
print("cleaned up after serving", flush=True)
"""


def test_the_gateway_closes_its_engine_channel_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """uvicorn raises SIGTERM again after its shutdown; the gateway's cleanup must still run."""
    port = free_port()
    closed = tmp_path / "closed"
    process = subprocess.Popen(
        [sys.executable, "-c", _GATEWAY_UNTIL_SIGTERM, str(port), str(closed)],
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _accepts(port), timeout=30, message="the gateway never listened")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert closed.read_text() == "closed"
    assert "cleaned up after serving" in stdout


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("taken", ["port", "metrics_port"])
def test_a_service_whose_port_is_taken_says_so_in_one_line(tmp_path: Path, taken: str) -> None:
    """A second risk beside the running stack's, on its gRPC port or its metrics port: its
    identity and CRLs are fine, its address is not; an operator's mistake, told as one (the
    last line on stderr, after its JSON log lines), never as a traceback."""
    with sandbox_stack() as native:
        running = FileRegistry(native.settings.registry).lookup("risk")
        second = replace(
            running,
            **{"port": free_port(), "metrics_port": free_port(), taken: getattr(running, taken)},
        )
        registry = tmp_path / "registry.json"
        write_registry(registry, [second])
        env = native.env | {
            "SPIFFE_ENDPOINT_SOCKET": native._workload_socket("risk"),
            "ZTBANK_REGISTRY": str(registry),
        }
        done = subprocess.run(
            [sys.executable, "-m", "services.risk"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    if taken == "port":
        assert done.returncode == 1, done.stderr
        assert last == (
            f"risk: cannot serve: cannot listen on {second.target}: the port is in use, or the"
            " address is not this machine's"
        )
    else:
        assert done.returncode == 2, done.stderr
        assert last == (
            f"risk: cannot serve metrics on {second.host}:{second.metrics_port}:"
            " Address already in use"
        )
