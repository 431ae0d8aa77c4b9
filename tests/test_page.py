"""The status page in a real headless browser: Debian's chromium and chromium-driver through
selenium, against the real bridge (`python -m bridge run`, its embedded broker and its
HTTP server on free ports) and the simulator in this process, whose meters the tests break
and whose relays they read.

Extended meters allow one request per 6 s, so a change at a meter (a fault, a relay
command) shows on the page within one poll and one refresh of the page (2 s): every wait
here ends on what the page shows, with a timeout, never after a fixed sleep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import Process

from bench import browser
from bench.support import LOOPBACK, free_port, wait_for_port, wait_until
from bridge.simulator import SimMeter, Simulator, make_fleet

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
if (_why := browser.missing()) is not None:
    pytest.skip(_why, allow_module_level=True)

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

#: A poll (6 s apart), the page's next refresh (2 s) and a slow shared machine.
SHOWS_WITHIN = 25.0
TOPICS = ("garage", "cellar", "attic")
NAMES = ("Garage", "Cellar", "Attic pump")


@pytest.fixture(scope="module")
def driver() -> Iterator[Chrome]:
    """One headless chromium for the module (it takes a second to start); each test loads
    the page afresh."""
    chrome = browser.chromium(1200, 800)
    yield chrome
    chrome.quit()


@dataclass
class Page:
    driver: Chrome
    sim: Simulator
    meters: dict[str, SimMeter]  # by topic

    def wait(self, what: str, predicate: Callable[[Chrome], object], timeout: float = SHOWS_WITHIN) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(predicate, f"page: {what}")

    def rows(self) -> list[dict[str, Any]]:
        """Every meter row in page order: its topic and the text of each data-field cell.

        Read in one script, so a refresh cannot land between two cells of one reading.
        """
        rows: list[dict[str, Any]] = self.driver.execute_script(
            """return [...document.querySelectorAll("[data-meter]")].map(row => {
                 const cells = {topic: row.dataset.meter};
                 for (const cell of row.querySelectorAll("[data-field]"))
                   cells[cell.dataset.field] = cell.textContent;
                 return cells;
               });"""
        )
        return rows

    def field(self, field: str) -> dict[str, str]:
        return {row["topic"]: row[field] for row in self.rows()}

    def summary(self) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, "[data-summary]").text)

    def shown(self) -> set[str]:
        """Topics of the rows the browser displays (not hidden by the filter)."""
        return {
            row.get_attribute("data-meter") or ""
            for row in self.driver.find_elements(By.CSS_SELECTOR, "[data-meter]")
            if row.is_displayed()
        }


@pytest.fixture
def open_page(
    driver: Chrome,
    simulator: Callable[..., Simulator],
    processes: list[Process],
    tmp_path: Path,
) -> Callable[..., Page]:
    """Start three extended meters and a bridge serving its page (`http` keys added to the
    config), open the page, and return once every row shows its meter online."""

    def start(**http: object) -> Page:
        meters = make_fleet(len(TOPICS), phases=3, extended=True)
        sim = simulator(meters)
        port = free_port()
        config = {
            "embedded_broker": {"host": LOOPBACK, "port": free_port()},
            "http": {"host": LOOPBACK, "port": port, **http},
            "devices": [
                {"id": m.devid, "pin": m.pin, "host": f"{LOOPBACK}:{sim.port}", "extended": True,
                 "topic": topic, "name": name, "timeout": 2}
                for m, topic, name in zip(meters, TOPICS, NAMES, strict=True)
            ],
        }  # fmt: skip
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        process = Process(tmp_path, "run", "--config", str(path))
        processes.append(process)
        try:
            wait_for_port(port, timeout=20)
        except TimeoutError:
            raise AssertionError("the bridge serves no page:\n" + process.stderr[-3000:]) from None
        driver.get(f"http://{LOOPBACK}:{port}/")
        page = Page(driver, sim, dict(zip(TOPICS, meters, strict=True)))
        page.wait(
            "every meter online",
            lambda d: page.field("availability") == dict.fromkeys(TOPICS, "online"),
        )
        return page

    return start


def test_one_row_per_meter_online_and_the_summary(open_page: Callable[..., Page]) -> None:
    page = open_page()
    rows = page.rows()
    assert sorted(row["topic"] for row in rows) == sorted(TOPICS)
    for row in rows:
        assert row["relay"] == "OFF" and row["error"] == "", row
        # A number and its unit, a no-break space between (2236 W, 64.70 MWh).
        assert re.fullmatch(r"\d+\xa0W", row["power"]) and re.fullmatch(
            r"[\d.]+\xa0[kM]?Wh", row["energy"]
        ), row
    page.wait("3 of 3 online", lambda d: page.summary().startswith("3 of 3 meters online"))
    assert page.shown() == set(TOPICS)


def test_the_filter_box_hides_rows_that_do_not_match(open_page: Callable[..., Page]) -> None:
    page = open_page()
    box = page.driver.find_element(By.ID, "filter")
    box.send_keys("CEL")  # by topic, any case
    page.wait("only cellar shown", lambda d: page.shown() == {"cellar"})
    box.clear()
    box.send_keys("pump")  # by name
    page.wait("only attic shown", lambda d: page.shown() == {"attic"})
    box.clear()
    box.send_keys("x")  # clear() sends no input event; typing and deleting does
    box.send_keys("\b")
    page.wait("every row shown again", lambda d: page.shown() == set(TOPICS))


def test_a_failing_meter_turns_offline_and_comes_first(open_page: Callable[..., Page]) -> None:
    page = open_page()
    attic = page.meters["attic"]  # last in the config, so last among the online rows
    page.sim.set_fault(attic.devid, "refuse")
    page.wait("attic offline", lambda d: page.field("availability")["attic"] == "offline")
    rows = page.rows()
    assert rows[0]["topic"] == "attic"
    assert [row["availability"] for row in rows] == ["offline", "online", "online"]
    assert rows[0]["error"] != ""  # the reason is shown with the row
    page.wait("2 of 3 online", lambda d: page.summary().startswith("2 of 3 meters online"))

    page.sim.set_fault(attic.devid, "ok")
    page.wait("attic online again", lambda d: page.field("availability")["attic"] == "online")
    assert [row["topic"] for row in page.rows()] == list(TOPICS)  # config order again


def test_pressing_on_switches_the_simulated_relay(open_page: Callable[..., Page]) -> None:
    page = open_page()
    cellar = page.meters["cellar"]
    button = page.driver.find_element(By.CSS_SELECTOR, '[data-meter="cellar"] [data-relay="ON"]')
    button.click()
    wait_until(lambda: cellar.pout == 1, SHOWS_WITHIN, "the simulated cellar relay switched on")
    page.wait("cellar relay ON", lambda d: page.field("relay")["cellar"] == "ON")
    assert [value for _, value in cellar.pout_requests] == [1]
    assert page.field("relay") == {"garage": "OFF", "cellar": "ON", "attic": "OFF"}
    assert all(m.pout == 0 for topic, m in page.meters.items() if topic != "cellar")
    assert page.driver.find_element(By.ID, "note").text == ""  # no error shown


def test_read_only_has_no_relay_buttons(open_page: Callable[..., Page]) -> None:
    page = open_page(read_only=True)
    assert page.driver.find_elements(By.CSS_SELECTOR, "[data-relay]") == []
    assert page.field("relay") == dict.fromkeys(TOPICS, "OFF")  # the state is still shown
