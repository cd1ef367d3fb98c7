"""The lab console in a real browser: headless chromium, driven by Selenium, on ``ztbank console``
serving a private native stack with 20 s SVIDs.

One stack, one console and one browser session for the whole module (the suite's wall time is
mostly the stack's start-up and one rotation).  The console runs as a subprocess exactly as an
operator starts it (``ztbank console`` with the stack's ``ZTBANK_*`` settings and a free
``ZTBANK_CONSOLE_PORT``), may be stopped and started again by a test, and is always stopped at
the end.  A second console serves an empty home: the page of a stack that is down.

Chromium and chromedriver come from Debian (``chromium``, ``chromium-driver``); when either is
missing they are installed with apt-get if this runs as root, else the suite is skipped saying
why.  Selenium is given both paths, so Selenium Manager never downloads anything.

Every test ends by asserting that the browser's console logged no error (SEVERE) but those the
test expects from the browser itself (it reports each HTTP error answer, e.g. a refused lab
start, and each failed connection), and leaves a screenshot of the page in ``var/screenshots/``
(gitignored; the path is printed at the end of the run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from services.stack.native import NativeStack
from services.stack.sandbox import REPO_ROOT, free_port, sandbox_settings, sandbox_stack
from tests.support.helpers import clean_environment, scrub_environment

SVID_TTL = "20s"
WINDOW = (1280, 1400)
CONSOLE_READY_SECONDS = 30.0
CONSOLE_STOP_SECONDS = 10.0
APT_SECONDS = 240.0
SCREENSHOTS = REPO_ROOT / "var" / "screenshots"
BROWSERS = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
TAKEN: list[Path] = []  # the screenshots of this run

T = TypeVar("T")


# -- chromium ------------------------------------------------------------------------------------


def _find_chromium() -> tuple[str, str] | None:
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which(DRIVER)
    return (browser, driver) if browser and driver else None


def _apt_install() -> str | None:
    """Install Debian's chromium and chromedriver; None if done, else why not.  Bounded: the
    two apt-get runs share APT_SECONDS (pytest-timeout counts this fixture too)."""
    if os.geteuid() != 0:
        return "not running as root, so apt-get cannot install them"
    if shutil.which("apt-get") is None:
        return "there is no apt-get here"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + APT_SECONDS
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
    ):
        try:
            result = subprocess.run(
                command,
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired:
            return f"apt-get did not finish within {APT_SECONDS} s"
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            return f"`{' '.join(command)}` failed: {' '.join(tail)}"
    return None


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver, installed with apt-get when missing (as root)."""
    found = _find_chromium()
    if found is None:
        why = _apt_install()
        found = _find_chromium()
        if found is None:
            pytest.skip(
                "the browser tests need chromium and chromedriver (Debian: apt-get install"
                f" chromium chromium-driver); they are missing and could not be installed: {why}"
            )
    return found


# -- the console ---------------------------------------------------------------------------------


class ConsoleProcess:
    """``ztbank console`` for one stack on one port, as an operator runs it; ``url`` is its
    page.  ``start()`` waits until it answers, ``stop()`` is SIGTERM (as Ctrl-C), then waits."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env = env
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return Path(self.env["ZTBANK_HOME"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = process = subprocess.Popen(
                [str(Path(sys.executable).with_name("ztbank")), "console"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + CONSOLE_READY_SECONDS
        while not _answers(f"{self.url}api/labs"):
            if process.poll() is not None:
                pytest.fail(f"ztbank console exited ({process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"ztbank console did not answer in time:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> float:
        """Seconds it took to stop."""
        began = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(CONSOLE_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return time.monotonic() - began

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``ztbank ARGS`` with the console's settings (the same stack)."""
        return subprocess.run(
            [str(Path(sys.executable).with_name("ztbank")), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@pytest.fixture(scope="module")
def run_console(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[dict[str, str]], ConsoleProcess]]:
    """Starts ``ztbank console`` for the settings in ``env`` on a free port; stops every one
    started at the end of the module, whatever happened."""
    started: list[ConsoleProcess] = []

    def start(stack_env: dict[str, str]) -> ConsoleProcess:
        port = free_port()
        env = clean_environment() | stack_env | {"ZTBANK_CONSOLE_PORT": str(port)}
        console = ConsoleProcess(env, port, tmp_path_factory.mktemp("console") / "console.log")
        started.append(console)
        console.start()
        return console

    try:
        yield start
    finally:
        for console in started:
            console.stop()


@pytest.fixture(scope="module")
def native_stack() -> Iterator[NativeStack]:
    """A private native stack (temp dir, free ports, 20 s SVIDs), always stopped and removed."""
    env = pytest.MonkeyPatch()
    try:
        scrub_environment(env)  # the stack's processes inherit this process's environment
        with sandbox_stack(svid_ttl=SVID_TTL) as stack:
            yield stack
    finally:
        env.undo()


@pytest.fixture(scope="module")
def console(
    native_stack: NativeStack, run_console: Callable[[dict[str, str]], ConsoleProcess]
) -> ConsoleProcess:
    return run_console(native_stack.env)


@pytest.fixture(scope="module")
def down_console(
    run_console: Callable[[dict[str, str]], ConsoleProcess],
) -> Iterator[ConsoleProcess]:
    """A console for a stack that was never started: an empty home, its own free ports."""
    root = Path(tempfile.mkdtemp(prefix="ztd", dir="/tmp"))
    try:
        yield run_console(NativeStack(sandbox_settings(root)).env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver(
    chromium: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[webdriver.Chrome]:
    """One headless chromium for the module, logging what the page's console says."""
    browser, chromedriver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.add_argument("--headless=new")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # chromium refuses to run as root otherwise
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument("--disable-gpu")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    service = Service(executable_path=chromedriver, log_output=str(log))
    try:
        session = webdriver.Chrome(options=options, service=service)
    except WebDriverException as error:
        pytest.fail(f"chromium did not start ({error.msg}); chromedriver's log: {log}")
    try:
        # The viewport itself is WINDOW (the window's own frame would take some of it).
        set_viewport(session, WINDOW)
        yield session
    finally:
        session.quit()


def set_viewport(driver: webdriver.Chrome, size: tuple[int, int]) -> None:
    metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


@contextmanager
def viewport(driver: webdriver.Chrome, size: tuple[int, int]) -> Iterator[None]:
    """The page seen at ``size`` for a while (a screenshot of more of it), then at WINDOW."""
    set_viewport(driver, size)
    try:
        yield
    finally:
        set_viewport(driver, WINDOW)


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """The page as it is now, in var/screenshots/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    TAKEN.append(path)
    return path


@dataclass
class Page:
    """The browser for one test, and the errors its console is expected to log (substrings):
    the browser itself reports every HTTP error answer the page receives (a refused lab start)
    and every failed connection (to a console that is stopped).  An expected error must be
    logged; an allowed one may be."""

    driver: webdriver.Chrome
    expected_errors: list[str] = field(default_factory=list)
    allowed_errors: list[str] = field(default_factory=list)

    def expect_error(self, text: str) -> None:
        self.expected_errors.append(text)

    def allow_error(self, text: str) -> None:
        self.allowed_errors.append(text)


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """What the page logged as errors (SEVERE) since the last call."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(e["message"]) for e in entries if e["level"] == "SEVERE"]


@pytest.fixture
def page(driver: webdriver.Chrome, request: pytest.FixtureRequest) -> Iterator[Page]:
    """The browser, for one test: its console must log no error but those the test expects,
    each of which it must log; a screenshot of where the test left the page is saved as
    var/screenshots/TEST.png."""
    console_errors(driver)  # what an earlier test's teardown left
    opened = Page(driver)
    yield opened
    screenshot(driver, request.node.name)
    errors = console_errors(driver)
    known = opened.expected_errors + opened.allowed_errors
    unexpected = [e for e in errors if not any(x in e for x in known)]
    assert not unexpected, "the browser console logged errors:\n" + "\n".join(unexpected)
    missing = [x for x in opened.expected_errors if not any(x in e for e in errors)]
    assert not missing, f"the browser console did not log {missing}; it logged {errors}"


def wait_for(
    driver: WebDriver,
    condition: Callable[[WebDriver], T],
    timeout: float,
    what: str | Callable[[], str],
) -> T:
    """Poll ``condition`` until it returns something truthy or ``timeout`` passes (DOM nodes
    replaced meanwhile are looked up again)."""
    wait: WebDriverWait[WebDriver] = WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return wait.until(condition)
    except TimeoutException as error:
        message = what() if callable(what) else what
        raise AssertionError(f"after {timeout:g} s: {message}") from error


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TAKEN:
        terminalreporter.write_line(f"browser screenshots ({len(TAKEN)}): {SCREENSHOTS}/")
