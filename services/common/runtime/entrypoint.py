"""The shared ``__main__`` of the services: settings, logging, serve, one-line failures."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import TypeVar

from services.common.errors import CommonError
from services.common.observability.logs import configure_json_logging
from services.common.runtime.service import GrpcService, ServiceRuntime, ServiceSettings
from services.common.settings import load_settings

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)
ServerT = TypeVar("ServerT")


def serve_grpc(service: GrpcService, runtime: ServiceRuntime) -> None:
    service.run()


def run_service(
    name: str,
    settings_class: type[SettingsT],
    create_server: Callable[[SettingsT], tuple[ServerT, ServiceRuntime]],
    serve: Callable[[ServerT, ServiceRuntime], None],
) -> int:
    """Start-up failures exit 2 (bad settings or identity) or 1, with one line on stderr; so
    does a server that cannot serve (exit 1)."""
    configure_json_logging(name)
    try:
        settings = load_settings(settings_class)
        server, runtime = create_server(settings)
    except CommonError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # every package's error root, reported in one line
        print(f"{name}: cannot start: {error}", file=sys.stderr)
        return 1
    # Everything built so far lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise walk it under load (tail latency).
    gc.freeze()
    try:
        serve(server, runtime)
    except CommonError as error:  # e.g. the port is taken: one line, as at start-up
        print(f"{name}: cannot serve: {error}", file=sys.stderr)
        return 1
    return 0
