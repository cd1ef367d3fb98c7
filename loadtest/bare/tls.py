"""Mutual TLS for the bare pipeline: gRPC credentials and the HTTPS server's context policy."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from pathlib import Path

import grpc

from loadtest.bare.certs import CertFiles

# The same policy as ztbank's endpoints: TLS 1.2 or newer, AEAD suites only, no tickets.
TLS12_AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
STOP_GRACE_SECONDS = 1.0


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_AEAD_CIPHERS)
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_credentials(files: CertFiles) -> grpc.ServerCredentials:
    """Serve ``files``' certificate; clients must present one signed by the CA."""
    return grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca.read_bytes(),
        require_client_auth=True,
    )


def secure_channel(files: CertFiles, target: str, server_name: str) -> grpc.aio.Channel:
    """A channel to ``target`` presenting ``files``' certificate and expecting the server to be
    ``server_name`` (a DNS SAN of its certificate: grpcio checks DNS names, not IPs)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )
    return grpc.aio.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )


def server_arguments(description: str | None) -> argparse.ArgumentParser:
    """What every bare process is started with: its port and the certificate directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--certs", type=Path, required=True, help="directory of make_certs")
    return parser


async def serve_until_terminated(server: grpc.aio.Server) -> None:
    """Run ``server`` (already bound) until SIGTERM or SIGINT, then stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    await server.stop(STOP_GRACE_SECONDS)
