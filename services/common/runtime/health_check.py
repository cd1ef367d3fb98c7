"""A service's health socket asked from a container's health check: the standard library only,
so that a check every few seconds costs a process start and nothing more (the ``ztbank`` command
imports the whole stack and takes a second of CPU).

``python -m services.common.runtime.health_check SOCKET [livez|readyz]`` prints the service's
answer and exits 0 when it is positive, 1 when it is not or nothing answers.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


class NoAnswerError(OSError):
    """Nothing answered on the socket, or not in HTTP with a JSON body."""


def ask(path: str, probe: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """``GET /<probe>`` on the unix socket ``path``: the HTTP status and the JSON document."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(path)
            client.sendall(f"GET /{probe} HTTP/1.0\r\n\r\n".encode())
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
    except OSError as error:
        raise NoAnswerError(f"no answer on {path}: {error.strerror or error}") from None
    head, _, body = reply.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b"\r\n", 1)[0].split()[1])
        document = json.loads(body)
    except (IndexError, ValueError):
        raise NoAnswerError(f"unreadable answer on {path}: {reply[:200]!r}") from None
    if not isinstance(document, dict) or not isinstance(document.get("reasons"), list):
        raise NoAnswerError(f"unreadable answer on {path}: {reply[:200]!r}")
    return status, document


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[1:] not in ([], ["livez"], ["readyz"]):
        print("usage: health_check SOCKET [livez|readyz]", file=sys.stderr)
        return 2
    try:
        status, document = ask(argv[0], argv[1] if len(argv) == 2 else "readyz", timeout=2.0)
    except NoAnswerError as error:
        print(error, file=sys.stderr)
        return 1
    print(document.get("status"), *document["reasons"], sep="\n  ")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
