"""The console's ASGI app: the page, its static files, a JSON API and one server-sent event
stream that carries everything live (stack state, decisions, latency, lab output).

Safe by default: it listens on 127.0.0.1 only (``server.py``) and answers only requests naming
that host (no DNS rebinding); the one action, starting a lab, needs a header a cross-site form
cannot send and is audited with the console's own SPIFFE ID; the page's Content-Security-Policy
allows scripts and styles from the console itself only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from services.common.authz.audit import AuditLog, AuditRecord
from services.common.identity.pem import fingerprint_sha256
from services.common.identity.source import SvidMaterial
from services.common.identity.workloads import SERVICES
from services.common.problem import problem, problem_response
from services.console.errors import (
    ConsoleError,
    LabBusyError,
    LabStartError,
    StackDownError,
    UnknownReportError,
)
from services.console.feeds import JsonLinesTail, ServedFeed, decision
from services.console.labs import LabRunner, lab_command
from services.console.settings import CONSOLE_HOST, ConsoleSettings
from services.labs.errors import LabError
from services.labs.support import LabLock, LabRunningError

STATIC = Path(__file__).parent / "static"
# A header a cross-site HTML form cannot send: a page elsewhere cannot start a lab.
ACTION_HEADER = "x-ztbank-console"
RECENT_DECISIONS = 200
QUEUE_SIZE = 1000
KEEPALIVE_SECONDS = 15.0
AUDIT_POLL_SECONDS = 0.25
SPANS_POLL_SECONDS = 1.0
MAX_REPORTS = 10
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class Broadcaster:
    """Fan-out of events to every open page; a page too slow to keep up is dropped (its
    EventSource reconnects and starts again from the current state)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[str | None]] = set()

    def publish(self, event: str, data: Any) -> None:
        message = sse(event, data)
        for queue in list(self._queues):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)  # tells that page's stream to end

    def close(self) -> None:
        """End every page's stream now (the console is shutting down): each page sees its
        stream end and reconnects, instead of having it cut after the shutdown's grace."""
        for queue in list(self._queues):
            self._queues.discard(queue)
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[str | None]]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


class StackReader(Protocol):
    """What the console reads of the stack (``state.StackView`` on a real one)."""

    def snapshot(self) -> dict[str, Any]: ...

    def identity(self) -> SvidMaterial | None: ...


class Console:
    """The live state behind the page, kept up to date by background loops."""

    def __init__(
        self,
        settings: ConsoleSettings,
        view: StackReader,
        audit: AuditLog,
        labs: Mapping[str, str],
        lab_env: Mapping[str, str],
        *,
        lab_command: Callable[[str], Sequence[str]] = lab_command,
    ) -> None:
        self.settings = settings
        self.view = view
        self.audit = audit
        self.events = Broadcaster()
        self.labs = LabRunner(labs, lab_env, self.events.publish, command=lab_command)
        self.starting = asyncio.Lock()  # held by a lab start from its check to the lab running
        self.state: dict[str, Any] | None = None
        self.decisions: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)
        self.metrics: dict[str, Any] = {}
        # Each service's files, in its own volume beside the compose stack.
        home = settings.home_of
        self._audits = [JsonLinesTail(home(w.name) / "audit" / f"{w.name}.jsonl") for w in SERVICES]
        started = time.time()
        self._spans = {
            w.name: ServedFeed(
                home(w.name) / "telemetry" / f"{w.name}-spans.jsonl", started=started
            )
            for w in SERVICES
        }

    async def refresh(self) -> dict[str, Any]:
        self.state = await asyncio.to_thread(self.view.snapshot)
        self.events.publish("state", self.state)
        return self.state

    async def _probe_loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.settings.console_probe_seconds)

    def read_decisions(self) -> list[dict[str, Any]]:
        """The decisions every service recorded since the last read, oldest first (the feed
        is one timeline, not one service's records after another's)."""
        items = [decision(record) for tail in self._audits for record in tail.read()]
        return sorted(items, key=lambda item: str(item["time"] or ""))

    async def _audit_loop(self) -> None:
        while True:
            for item in self.read_decisions():
                self.decisions.append(item)
                self.events.publish("decision", item)
            await asyncio.sleep(AUDIT_POLL_SECONDS)

    async def _spans_loop(self) -> None:
        while True:
            now = time.time()
            for name, feed in self._spans.items():
                # In a worker thread: the first poll parses up to SPANS_BACKFILL_BYTES of spans,
                # which would hold up the event stream and the API.
                self.metrics[name] = await asyncio.to_thread(feed.poll, now)
            self.events.publish("metrics", self.metrics)
            await asyncio.sleep(SPANS_POLL_SECONDS)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        loops = [
            asyncio.create_task(loop())
            for loop in (self._probe_loop, self._audit_loop, self._spans_loop)
        ]
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.labs.aclose()

    def reports(self) -> list[dict[str, Any]]:
        """The newest locust HTML reports of ``make load`` / ``make load-chaos``."""
        directory = self.settings.home / "load"
        found = sorted(directory.glob("*.html"), key=lambda p: p.stat().st_mtime, reverse=True)[
            :MAX_REPORTS
        ]
        return [
            {"name": p.name, "url": f"/reports/{p.name}", "modified": p.stat().st_mtime}
            for p in found
        ]

    def take_lab_lock(self, name: str) -> LabLock:
        """The stack's lab lock for lab ``name`` (services.labs.support.LabLock, which ``ztbank
        lab`` takes too), or LabBusyError naming the lab that holds it."""
        try:
            return LabLock.take(self.settings, name, "console")
        except LabRunningError as error:
            raise LabBusyError(str(error)) from None
        except LabError as error:
            raise LabStartError(str(error)) from None

    async def audit_lab_start(
        self, request: Request, name: str, allowed: bool, reason: str
    ) -> None:
        """One record per lab start asked for: who asked is the console's own identity (the
        page itself is not authenticated: anyone on this machine's loopback may use it)."""
        identity = self.view.identity()
        client = request.client
        record = AuditRecord(
            caller_spiffe_id=self.state["console"]["spiffe_id"] if self.state else None,
            cert_serial=identity.serial if identity else None,
            cert_sha256=fingerprint_sha256(identity.leaf) if identity else None,
            source_addr=client.host if client else "",
            source_port=client.port if client else None,
            dest_addr=CONSOLE_HOST,
            dest_port=self.settings.console_port,
            tls_version=None,
            cipher=None,
            service="console",
            method=f"POST /api/labs/{name}",
            decision="allow" if allowed else "deny",
            reason=reason,
            trace_id=None,
            cert_subject=identity.leaf.subject.rfc4514_string() if identity else None,
        )
        await asyncio.wrap_future(self.audit.submit(record))


def create_console_app(console: Console) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with console.running():
            yield

    app = FastAPI(
        title="ztbank lab console",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    port = console.settings.console_port
    app.add_middleware(
        TrustedHostMiddleware,
        allowed_hosts=[CONSOLE_HOST, "localhost", f"{CONSOLE_HOST}:{port}", f"localhost:{port}"],
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["content-security-policy"] = CSP
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "no-referrer"
        return response

    @app.exception_handler(ConsoleError)
    async def console_error(_: Request, error: ConsoleError) -> Response:
        return problem_response(problem(error.status, title=error.title, detail=str(error)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        return problem_response(problem(error.status_code, detail=str(error.detail)))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/state")
    async def state() -> dict[str, Any]:
        return {
            "state": console.state or await console.refresh(),
            "metrics": console.metrics,
            "decisions": list(console.decisions),
            "lab": console.labs.last.document() if console.labs.last else None,
            "labs": console.labs.labs,
            "reports": console.reports(),
        }

    @app.get("/api/labs")
    async def labs() -> dict[str, Any]:
        return {"labs": console.labs.labs, "running": console.labs.running is not None}

    @app.post("/api/labs/{name}", status_code=202)
    async def start_lab(name: str, request: Request) -> JSONResponse:
        if request.headers.get(ACTION_HEADER) != "start":
            return problem_response(
                problem(403, detail=f"starting a lab needs the header {ACTION_HEADER}: start")
            )
        # One start at a time from check to start: a double click sends two requests, and the
        # second must find the first one's lab running (refused and audited as such), not pass
        # the check while the first one awaits the probes.
        async with console.starting:
            lock = None
            try:
                console.labs.check(name)
                # The stack's one lab lock, before the probe: a lab of the CLI that holds it
                # (the outage lab stops the issuer) is named as the reason, not a stack "down".
                lock = console.take_lab_lock(name)
                current = await console.refresh()  # the stack as it is now, not 2 s ago
                if not current["up"]:
                    raise StackDownError(
                        f"the stack is down: start it with `make up`; {current['start_hint']}"
                    )
            except ConsoleError as error:
                if lock is not None:
                    lock.release()
                await console.audit_lab_start(request, name, False, str(error))
                raise
            except BaseException:
                if lock is not None:
                    lock.release()
                raise
            reason = f"lab {name} started from the console"
            await console.audit_lab_start(request, name, True, reason)
            run = await console.labs.start(name, lock)  # the lab holds the lock from now on
        return JSONResponse(run.document(), status_code=202)

    @app.get("/api/reports")
    async def reports() -> dict[str, Any]:
        return {"reports": console.reports()}

    @app.get("/reports/{name}", include_in_schema=False)
    async def report(name: str) -> FileResponse:
        known = {r["name"] for r in console.reports()}
        if name not in known:  # only what the listing names: no path reaches anything else
            raise UnknownReportError(f"no load report {name!r}; see /api/reports")
        return FileResponse(console.settings.home / "load" / name)

    @app.get("/api/events")
    async def events() -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            with console.events.subscribe() as queue:
                while True:
                    try:
                        message = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if message is None:
                        return
                    yield message

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-store"}
        )

    return app
