"""A scripted ``docker`` for services/stack/compose.py and what drives it: it answers by rules
and records every call."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.stack.compose import Completed, ComposeStack, Docker

Answer = Callable[[Sequence[str]], Completed]


def inspected(service: str, status: str, health: str = "", code: int = 0) -> dict[str, object]:
    one_shot = service in ("entries", "vault-tls", "vault-bootstrap", "e2e")
    return {
        "Name": f"/ztbank_{service}_1",
        "Config": {"Labels": {"com.docker.compose.service": service}},
        "State": {"Status": status, "ExitCode": code}
        | ({"Health": {"Status": health}} if health else {}),
        "HostConfig": {"RestartPolicy": {"Name": "no" if one_shot else "unless-stopped"}},
    }


HEALTHY = [
    inspected("vault-tls", "exited"),
    inspected("vault-bootstrap", "exited"),
    inspected("issuer", "running", "healthy"),
    inspected("entries", "exited"),
    inspected("gateway", "running", "healthy"),
]


@dataclass
class FakeDocker:
    """Answers by the first rule whose words all appear in the call; records every call."""

    rules: list[tuple[tuple[str, ...], Answer]] = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)
    streamed: list[list[str]] = field(default_factory=list)
    stream_rc: int = 0

    def on(self, *words: str, rc: int = 0, out: str = "") -> FakeDocker:
        self.rules.append((words, lambda _argv: Completed(rc, out)))
        return self

    def run(self, argv: Sequence[str], _env: Mapping[str, str], log: Path | None) -> Completed:
        self.calls.append(list(argv))
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("fake log\n")
        for words, answer in self.rules:
            if all(word in argv for word in words):
                return answer(argv)
        return Completed(0, "")

    def stream(self, argv: Sequence[str], _env: Mapping[str, str]) -> int:
        self.streamed.append(list(argv))
        return self.stream_rc

    def docker(self) -> Docker:
        return Docker(run=self.run, stream=self.stream, env={"PATH": "/usr/bin"})

    def called(self, *words: str) -> list[int]:
        return [i for i, argv in enumerate(self.calls) if all(w in argv for w in words)]


def stack_with(
    fake: FakeDocker, tmp_path: Path, containers: list[dict[str, object]]
) -> ComposeStack:
    fake.on("docker-compose", "ps", out="c1 c2\n").on("inspect", out=json.dumps(containers))
    return ComposeStack(
        fake.docker(),
        ["docker-compose"],
        offline=True,
        project="ztbank-test",
        log_dir=tmp_path / "logs",
        say=lambda _line: None,
    )
