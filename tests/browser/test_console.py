"""The lab console as a trainee sees it in chromium: the stack's services and their rotating
SVIDs, a lab started with its button (and double-clicked), the decisions feed, the console
restarted under an open page, and a stack that is down.

Everything asserted is read from the page (what is displayed), and compared with what the CLI
says of the same stack at the same time.  Waits are bounded waits on the page.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select

from services.console.server import SHUTDOWN_GRACE_SECONDS
from services.labs.errors import LabError
from services.labs.teller import TellerClient
from services.stack.native import NativeStack
from tests.browser.conftest import ConsoleProcess, Page, screenshot, viewport, wait_for

pytestmark = pytest.mark.browser

SERVICES = ("gateway", "transfer-engine", "risk")
PAGE_SECONDS = 15.0  # the page has loaded /api/state and drawn the cards
STATE_SECONDS = 6.0  # the console probes every 2 s: the page follows within a few seconds
# 20 s SVIDs are renewed at 40-50 % of their life (8-10 s), the page probes every 2 s.
ROTATION_SECONDS = 14.0
LAB_SECONDS = 60.0
LAB_START_SECONDS = 20.0
RECONNECT_SECONDS = 15.0  # EventSource retries every 3 s or so
DOCS_SCREENSHOT = "console-docs"  # .png, copied by hand to docs/images/console.png
DOCS_SIZE = (1280, 1640)
BANKING_INTERVAL = 1.0
CHART_SECONDS = 300 + 10  # the window and the step still filling


def open_console(driver: WebDriver, console: ConsoleProcess) -> None:
    driver.get(console.url)
    wait_for(
        driver,
        lambda d: len(cards(d)) == len(SERVICES),
        PAGE_SECONDS,
        lambda: f"the page shows cards {sorted(cards(driver))}",
    )


def cards(driver: WebDriver) -> dict[str, dict[str, str]]:
    """Each service card as displayed: health, SVID serial, expires in, rotates in."""
    shown: dict[str, dict[str, str]] = driver.execute_script(
        """
        const text = (card, selector) => card.querySelector(selector).textContent;
        return Object.fromEntries([...document.querySelectorAll("article.card")].map((card) =>
          [card.dataset.service, { health: text(card, ".health"), serial: text(card, ".serial"),
            expires: text(card, ".expires"), rotates: text(card, ".rotates") }]));
        """
    )
    return shown


def chart_spans(driver: WebDriver) -> list[float]:
    """The seconds each chart's time axis spans (the page's uPlot charts)."""
    spans: list[float] = driver.execute_script(
        "return Object.values(state.charts).map((c) => c.scales.x.max - c.scales.x.min);"
    )
    return spans


def assert_charts_span_minutes(driver: WebDriver) -> None:
    """Three charts, each over at most the console's 5 minutes (a console just started has
    one step of data: uPlot alone would spread it over years)."""
    wait_for(driver, lambda d: len(chart_spans(d)) == 3, STATE_SECONDS, "no charts drawn")
    spans = chart_spans(driver)
    assert all(0 < span <= CHART_SECONDS for span in spans), spans


def serial_shown(service: str, serial: str) -> Callable[[WebDriver], bool]:
    return lambda driver: cards(driver)[service]["serial"] == serial


def text(driver: WebDriver, element_id: str) -> str:
    """The element's text as displayed (lines wrapped by the browser are not broken)."""
    return str(driver.find_element(By.ID, element_id).get_attribute("textContent"))


def lab_button(driver: WebDriver, lab: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'#lab-buttons button[data-lab="{lab}"]')


def wait_for_verdict(driver: WebDriver, verdict: str) -> None:
    """Until the lab shown has ended (bounded), then its verdict must be ``verdict``."""
    ended = wait_for(
        driver,
        lambda d: text(d, "lab-verdict") in ("passed", "failed") and text(d, "lab-verdict"),
        LAB_SECONDS,
        lambda: f"the lab has not ended; it says:\n{text(driver, 'lab-output')}",
    )
    assert ended == verdict, f"lab {ended}:\n{text(driver, 'lab-output')}"


class Banking:
    """A teller at work in the background (a balance check a second, a transfer every few),
    so that the feed and the latency charts have something to show."""

    def __init__(self, stack: NativeStack) -> None:
        self._stack = stack
        self._stop = threading.Event()
        self._working = threading.Event()
        self._working.set()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._work, name="teller", daemon=True)

    def _work(self) -> None:
        for turn in itertools.count():
            if self._stop.wait(BANKING_INTERVAL):
                return
            if not self._working.is_set():
                continue
            try:
                # A new client each time: one holds the SVID it was given (20 s here).
                teller = TellerClient(self._stack.settings)
                teller.as_customer("alice", "GET", "/v1/accounts")
                if turn % 5 == 0:
                    teller.transfer("alice", "acc-alice-cny", "acc-bob-cny", "0.01", "CNY")
            except LabError as error:
                self.errors.append(str(error))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No new requests meanwhile (the feed's newest rows are then a lab's)."""
        self._working.clear()
        try:
            yield
        finally:
            self._working.set()

    def __enter__(self) -> Banking:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def banking(native_stack: NativeStack) -> Iterator[Banking]:
    with Banking(native_stack) as teller:
        yield teller
    # What these tests see of the bank must be a bank at work, not one refusing its teller.
    assert not teller.errors, f"the teller in the background failed: {teller.errors[:3]}"


def test_the_cards_show_the_services_ztbank_status_shows(
    page: Page, console: ConsoleProcess
) -> None:
    open_console(page.driver, console)
    assert text(page.driver, "stack-state") == "stack up"
    assert_charts_span_minutes(page.driver)
    assert not page.driver.find_element(By.ID, "down").is_displayed()
    matched: set[str] = set()

    def same_serials() -> bool:
        # SVIDs rotate every 8-10 s and the page lags the probes by up to 2 s: each service's
        # serial must show on the page as the CLI saw it, within a few seconds of the CLI.
        status = console.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        services = json.loads(status.stdout)["services"]
        assert all(services[name]["healthy"] for name in SERVICES), services
        for name in set(SERVICES) - matched:
            try:
                wait_for(
                    page.driver,
                    serial_shown(name, services[name]["svid_serial"]),
                    STATE_SECONDS,
                    "",
                )
                matched.add(name)
            except AssertionError:
                pass  # rotated again in between: ask the CLI again
        return matched == set(SERVICES)

    wait_for(
        page.driver,
        lambda _: same_serials(),
        3 * STATE_SECONDS,
        lambda: (
            f"the page's serials {cards(page.driver)} are not those of ztbank status"
            f" (matched: {sorted(matched)})"
        ),
    )
    shown = cards(page.driver)
    assert {name: card["health"] for name, card in shown.items()} == dict.fromkeys(
        SERVICES, "healthy"
    )
    for card in shown.values():
        assert re.fullmatch(r"\d+ s", card["expires"]), card  # 20 s SVIDs: seconds left


def test_a_rotation_shows_new_serials_within_one_rotation_period(
    page: Page, console: ConsoleProcess
) -> None:
    open_console(page.driver, console)
    before = {name: card["serial"] for name, card in cards(page.driver).items()}
    assert all(re.fullmatch(r"[0-9a-f]{16,}", serial) for serial in before.values()), before

    def rotated() -> set[str]:
        return {n for n, card in cards(page.driver).items() if card["serial"] != before[n]}

    wait_for(
        page.driver,
        lambda _: rotated() == set(SERVICES),
        ROTATION_SECONDS,
        lambda: (
            f"only {sorted(rotated())} show a new serial; before {before}, now {cards(page.driver)}"
        ),
    )
    shown = cards(page.driver)
    assert all(re.fullmatch(r"[0-9a-f]{16,}", card["serial"]) for card in shown.values()), shown
    assert {card["health"] for card in shown.values()} == {"healthy"}


def test_the_revocation_lab_passes_from_its_button_and_the_feed_shows_the_deny(
    page: Page, console: ConsoleProcess, banking: Banking
) -> None:
    with banking.paused():
        check_the_revocation_lab(page, console)


def check_the_revocation_lab(page: Page, console: ConsoleProcess) -> None:
    driver = page.driver
    open_console(driver, console)
    lab_button(driver, "revocation").click()
    wait_for_verdict(driver, "passed")
    output = text(driver, "lab-output").splitlines()
    assert output[0].startswith("lab revocation:"), output
    assert output[-1].startswith("lab passed:"), output
    assert not driver.find_element(By.ID, "lab-message").is_displayed()
    victim = re.search(r"victim: serial ([0-9a-f]{8,})", output[1])  # shortened, then "…"
    assert victim, output
    serial = victim.group(1)

    # The gateway's refusal of the revoked client, live from its audit.
    Select(driver.find_element(By.ID, "filter-decision")).select_by_visible_text("deny")
    deny = 'tbody#feed tr[data-decision="deny"][data-service="gateway"]'
    wait_for(
        driver,
        lambda d: any(
            "certificate revoked" in r.text for r in d.find_elements(By.CSS_SELECTOR, deny)
        ),
        STATE_SECONDS,
        lambda: f"no gateway deny of a revoked certificate in the feed:\n{text(driver, 'feed')}",
    )
    assert not driver.find_elements(By.CSS_SELECTOR, 'tbody#feed tr[data-decision="allow"]')
    # ... and the issuer's CRL as the revocation panel lists it: the victim's serial.
    wait_for(
        driver,
        lambda d: serial in text(d, "revoked"),
        STATE_SECONDS,
        lambda: f"serial {serial}… is not in the revocation list:\n{text(driver, 'revoked')}",
    )

    # The state the docs show: every decision, the lab's narration, the charts.
    Select(driver.find_element(By.ID, "filter-decision")).select_by_visible_text("all")
    assert driver.find_elements(By.CSS_SELECTOR, 'tbody#feed tr[data-decision="allow"]')
    assert len(driver.find_elements(By.CSS_SELECTOR, "#charts .uplot canvas")) == 3
    driver.execute_script("window.scrollTo(0, 0)")
    with viewport(driver, DOCS_SIZE):  # tall enough for the lab's rows of the feed
        screenshot(driver, DOCS_SCREENSHOT)


def test_a_double_click_starts_one_lab_and_says_a_lab_is_running(
    page: Page, console: ConsoleProcess
) -> None:
    driver = page.driver
    open_console(driver, console)
    button = lab_button(driver, "revocation")
    wait_for(driver, lambda _: button.is_enabled(), LAB_SECONDS, "the lab buttons stay disabled")
    # Two clicks before the page hears of the first lab (it disables the buttons then): the
    # second start reaches the console while the first lab runs.
    driver.execute_script("arguments[0].click(); arguments[0].click();", button)
    page.expect_error(
        "/api/labs/revocation - Failed to load resource: the server responded"
        " with a status of 409 (Conflict)"
    )
    message = wait_for(  # once the first start is through: it probes the stack first
        driver,
        lambda d: d.find_element(By.ID, "lab-message").text,
        LAB_START_SECONDS,
        "no message after the second click",
    )
    assert message.startswith("A lab is running: lab 'revocation' is running"), message
    wait_for_verdict(driver, "passed")
    # One lab ran (one narration), and the message went with it.
    output = text(driver, "lab-output")
    assert output.count("lab revocation:") == 1, output
    wait_for(
        driver,
        lambda d: not d.find_element(By.ID, "lab-message").is_displayed(),
        STATE_SECONDS,
        "the 'A lab is running' message stays after the lab ended",
    )
    records = [
        json.loads(line)
        for line in (console.home / "audit" / "console.jsonl").read_text().splitlines()
    ]
    assert [r["decision"] for r in records[-2:]] == ["allow", "deny"], records[-2:]


def test_the_page_follows_a_console_restart_and_shows_what_it_missed(
    page: Page, console: ConsoleProcess, native_stack: NativeStack
) -> None:
    driver = page.driver
    open_console(driver, console)
    # Stopped as Ctrl-C stops it: the open event stream is ended, not held until the grace
    # period runs out.
    assert console.stop() < SHUTDOWN_GRACE_SECONDS
    # While nothing listens, the browser reports each reconnection attempt that fails.
    page.allow_error("/api/events - Failed to load resource: net::ERR_CONNECTION_REFUSED")
    wait_for(
        driver,
        lambda d: text(d, "stack-state") == "console reconnecting…",
        STATE_SECONDS,
        lambda: f"the page shows {text(driver, 'stack-state')!r} with the console stopped",
    )
    path = f"/v1/accounts/acc-while-away-{uuid.uuid4().hex[:8]}"  # a decision meanwhile
    assert TellerClient(native_stack.settings).as_customer("alice", "GET", path).status == 403
    console.start()  # on the same port at once, as `make console` again
    wait_for(
        driver,
        lambda d: text(d, "stack-state") == "stack up",
        RECONNECT_SECONDS,
        lambda: f"the page shows {text(driver, 'stack-state')!r} with the console back",
    )
    wait_for(
        driver,
        lambda d: path in text(d, "feed"),
        STATE_SECONDS,
        lambda: f"the decision on {path}, made while the console was away, is not in the feed",
    )
    assert {card["health"] for card in cards(driver).values()} == {"healthy"}
    assert_charts_span_minutes(driver)


def test_a_stack_that_is_down_shows_how_to_start_it(
    page: Page, down_console: ConsoleProcess
) -> None:
    driver = page.driver
    driver.get(down_console.url)
    wait_for(
        driver,
        lambda d: text(d, "stack-state") == "stack down",
        PAGE_SECONDS,
        lambda: f"the stack shows as {text(driver, 'stack-state')!r}",
    )
    banner = driver.find_element(By.ID, "down")
    assert banner.is_displayed()
    assert text(driver, "start-command") == "make up"
    assert str(down_console.home) in text(driver, "down-hint"), text(driver, "down-hint")
    assert {card["health"] for card in cards(driver).values()} <= {"down"}
    lab_button(driver, "revocation").click()
    page.expect_error(
        "/api/labs/revocation - Failed to load resource: the server responded with a status of 503"
    )
    message = wait_for(
        driver,
        lambda d: d.find_element(By.ID, "lab-message").text,
        STATE_SECONDS,
        "no message after starting a lab on a stack that is down",
    )
    assert message.startswith("The stack is down: start it with `make up`"), message
