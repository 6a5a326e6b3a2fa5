"""The web console in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium against a live console, with writes from the Python client happening underneath.

Every step waits for what a person would see (WebDriverWait on the DOM), never for a fixed time, and
saves a screenshot under the test's tmp dir. Without chromedriver the tests skip, except in CI
(``CI`` set), where a missing browser is a failure of the set-up.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

import shardstate
from bench.browser import browser_missing, headless_chromium

pytestmark = pytest.mark.timeout(240)

WAIT_S = 20.0  # upper bound for anything to show; the waits return as soon as it does


def _need_browser() -> None:
    reason = browser_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser test in CI: {reason}")
    pytest.skip(reason)


class Page:
    """One browser tab on the console, with waits and screenshots."""

    def __init__(self, driver: WebDriver, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        self.step = 0

    def shot(self, name: str) -> Path:
        self.step += 1
        path = self.shots / f"{self.step:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def until(self, cond: Callable[[WebDriver], Any], what: str, timeout: float = WAIT_S) -> Any:
        def check(d: WebDriver) -> Any:
            try:
                return cond(d)
            except StaleElementReferenceException:
                return False  # re-rendered under us: look again

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check, f"waiting for {what}")

    def all(self, selector: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def one(self, selector: str) -> WebElement:
        return self.until(lambda d: _first_visible(self.all(selector)), selector)

    def click(self, selector: str) -> None:
        self.until(lambda d: _enabled(_first_visible(self.all(selector))), f"{selector} clickable").click()

    def text(self, selector: str) -> str:
        found = self.all(selector)
        return found[0].text if found else ""

    def gone(self, selector: str) -> None:
        self.until(lambda d: not any(e.is_displayed() for e in self.all(selector)), f"{selector} gone")

    # -- console specifics

    def group_row(self, group: str) -> str:
        return f'[data-testid="group-row"][data-group="{group}"]'

    def item_row(self, key: str) -> str:
        return f'[data-testid="item-row"][data-key="{key}"]'

    def group_count(self, group: str) -> str:
        return self.text(f'{self.group_row(group)} [data-testid="group-count"]')

    def wait_count(self, group: str, n: int) -> None:
        self.until(lambda d: self.group_count(group) == str(n), f"{group} count {n}")
        self.until(lambda d: self.text('[data-testid="count"]') in ("", str(n)), f"header count {n}")

    def open_group(self, group: str) -> None:
        self.click(self.group_row(group))
        self.until(lambda d: self.text('[data-testid="group-title"]') == group, f"{group} opened")

    def open_item(self, key: str) -> None:
        self.click(self.item_row(key))
        self.until(lambda d: self.text('[data-testid="panel-key"]') == key, f"{key} in the side panel")

    def keys(self) -> list[str]:
        """The keys of the item rows shown, top to bottom."""
        return [r.get_attribute("data-key") or "" for r in self.all('[data-testid="item-row"]')]

    def preview(self, key: str) -> str:
        return self.text(f'{self.item_row(key)} [data-testid="item-preview"]')

    def type_into(self, selector: str, text: str) -> None:
        box = self.one(selector)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)


def _first_visible(elements: list[WebElement]) -> WebElement | None:
    return next((e for e in elements if e.is_displayed()), None)


def _enabled(element: WebElement | None) -> WebElement | None:
    return element if element is not None and element.is_enabled() else None


@pytest.fixture
def page(console: shardstate.ConsoleInfo, tmp_path: Path) -> Iterator[Page]:
    """A fresh headless Chromium (own profile in tmp_path) signed in to the session's console."""
    _need_browser()
    driver = headless_chromium(str(tmp_path / "profile"))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    p = Page(driver, shots)
    try:
        driver.get(f"{console.url.rstrip('/')}/?token={console.token}")
        p.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "ready")
        p.until(lambda d: "live" in p.text('[data-testid="live"]'), "live event stream")
        yield p
    finally:
        try:
            p.shot("last")
        finally:
            driver.quit()
            shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def _group(tag: str) -> str:
    return f"web-{tag}-{uuid.uuid4().hex[:10]}"


def test_sees_group_and_count_opens_it_and_edits_a_value(state: shardstate.StateClient, page: Page) -> None:
    group = _group("edit")
    for i in range(3):
        state.set(group, f"k{i}", {"n": i})
    page.driver.refresh()  # the group existed before this page loaded: it comes from the groups list
    page.one(page.group_row(group))
    page.wait_count(group, 3)
    page.shot("group-listed")

    page.open_group(group)
    page.until(lambda d: len(page.all('[data-testid="item-row"]')) == 3, "three rows")
    assert page.keys() == ["k0", "k1", "k2"]
    assert page.preview("k1") == '{"n":1}'
    page.shot("group-open")

    page.open_item("k1")
    page.click('[data-testid="edit"]')
    page.type_into('[data-testid="editor"]', '{"n": 1, "edited": ')  # not JSON yet
    page.until(lambda d: not page.one('[data-testid="save"]').is_enabled(), "save disabled while invalid")
    assert "\u2717" in page.text('[data-testid="editor-status"]')
    page.shot("editor-invalid")
    page.one('[data-testid="editor"]').send_keys("true}")
    page.until(lambda d: page.one('[data-testid="save"]').is_enabled(), "save enabled once valid")
    page.click('[data-testid="save"]')

    page.until(lambda d: state.get(group, "k1") == {"n": 1, "edited": True}, "the edit stored")
    page.until(lambda d: page.preview("k1") == '{"n":1,"edited":true}', "row shows the saved value")
    assert page.all('[data-testid="editor"]')[0].is_displayed() is False
    page.shot("saved")


def test_python_writes_appear_change_and_vanish_live(state: shardstate.StateClient, page: Page) -> None:
    group = _group("live")
    state.set(group, "b", 1)
    page.one(page.group_row(group))  # a new group appears live
    page.wait_count(group, 1)
    page.open_group(group)
    page.one(page.item_row("b"))
    page.shot("before")

    state.set(group, "a", {"new": True})  # a new row, in key order
    page.one(page.item_row("a"))
    page.wait_count(group, 2)
    assert page.keys() == ["a", "b"]
    page.shot("row-appeared")

    page.open_item("b")
    version_before = int(page.text(f'{page.item_row("b")} [data-testid="item-version"]'))
    state.set(group, "b", [1, 2, 3])  # a changed value (and version), in the row and the open panel
    page.until(lambda d: page.preview("b") == "[1,2,3]", "changed value")
    page.until(lambda d: int(page.text('[data-testid="panel-version"]')) > version_before, "new version")
    assert int(page.text(f'{page.item_row("b")} [data-testid="item-version"]')) > version_before
    page.shot("row-changed")

    state.delete(group, "a")  # a deleted row vanishes
    page.gone(page.item_row("a"))
    page.wait_count(group, 1)
    page.shot("row-vanished")

    page.click('[data-testid="tab-events"]')  # the events panel has the three writes, newest first
    rows = page.until(lambda d: page.all(f'[data-testid="event-row"][data-group="{group}"]'), "events listed")
    assert [r.get_attribute("data-key") for r in rows][:3] == ["a", "b", "a"]
    page.type_into('[data-testid="events-filter"]', "no-such-group-or-key")
    page.until(lambda d: not page.all('[data-testid="event-row"]'), "filter hides rows")
    page.type_into('[data-testid="events-filter"]', group)
    page.until(lambda d: len(page.all('[data-testid="event-row"]')) >= 4, "filter shows this group's rows")
    page.click('[data-testid="events-pause"]')
    state.set(group, "while-paused", 1)
    page.until(lambda d: "1 new while paused" in page.text('[data-testid="events-info"]'), "paused count")
    assert not page.all('[data-testid="event-row"][data-key="while-paused"]')
    page.click('[data-testid="events-pause"]')
    page.one('[data-testid="event-row"][data-key="while-paused"]')
    page.shot("events")


def test_delete_asks_for_confirmation(state: shardstate.StateClient, page: Page) -> None:
    group = _group("del")
    state.set(group, "keep", 1)
    state.set(group, "drop", 2)
    page.wait_count(group, 2)
    page.open_group(group)
    page.open_item("drop")

    page.click('[data-testid="delete"]')
    page.one('[data-testid="delete-dialog"]')
    page.shot("confirm-dialog")
    page.click('[data-testid="cancel-delete"]')  # cancelled: nothing happens
    page.gone('[data-testid="delete-dialog"]')
    assert state.get(group, "drop") == 2

    page.click('[data-testid="delete"]')
    page.click('[data-testid="confirm-delete"]')
    page.gone(page.item_row("drop"))
    page.until(lambda d: state.get(group, "drop") is None, "deleted in the store")
    assert state.get(group, "keep") == 1
    page.wait_count(group, 1)
    page.shot("deleted")


def test_conflict_when_the_value_changed_underneath(state: shardstate.StateClient, page: Page) -> None:
    group = _group("cas")
    state.set(group, "doc", {"v": 1})
    page.wait_count(group, 1)
    page.open_group(group)
    page.open_item("doc")
    page.click('[data-testid="edit"]')
    page.type_into('[data-testid="editor"]', '{"v": "from the browser"}')

    state.set(group, "doc", {"v": "from python"})  # another client writes while the edit is open
    page.until(lambda d: page.one('[data-testid="panel-notice"]').is_displayed(), "changed-underneath notice")
    page.click('[data-testid="save"]')

    conflict = page.one('[data-testid="conflict"]')
    assert "from python" in page.text('[data-testid="conflict-current"]')
    assert "Nothing was saved" in conflict.text
    assert state.get(group, "doc") == {"v": "from python"}  # not overwritten
    assert json.loads(page.one('[data-testid="editor"]').get_attribute("value")) == {"v": "from the browser"}
    page.shot("conflict")

    page.click('[data-testid="conflict-reload"]')  # take the stored value
    page.gone('[data-testid="conflict"]')
    page.until(lambda d: "from python" in page.text('[data-testid="viewer"]'), "the stored value shown")

    page.click('[data-testid="edit"]')  # and a second conflict, this time overwritten on purpose
    page.type_into('[data-testid="editor"]', '{"v": "mine"}')
    state.set(group, "doc", {"v": "python again"})
    page.click('[data-testid="save"]')
    page.one('[data-testid="conflict"]')
    page.click('[data-testid="conflict-overwrite"]')
    page.until(lambda d: state.get(group, "doc") == {"v": "mine"}, "overwritten on request")
    page.shot("overwritten")


def test_clear_group_needs_its_name_typed(state: shardstate.StateClient, page: Page) -> None:
    group = _group("clear")
    for i in range(5):
        state.set(group, f"k{i}", i)
    page.wait_count(group, 5)
    page.open_group(group)
    page.one(page.item_row("k4"))

    page.click('[data-testid="clear-group"]')
    page.one('[data-testid="clear-dialog"]')
    confirm = page.one('[data-testid="confirm-clear"]')
    assert not confirm.is_enabled()
    page.type_into('[data-testid="confirm-clear-input"]', group[:-1])  # not quite the name
    assert not confirm.is_enabled()
    page.shot("clear-wrong-name")
    page.one('[data-testid="confirm-clear-input"]').send_keys(group[-1])
    page.click('[data-testid="confirm-clear"]')

    page.until(lambda d: state.items(group) == [], "group cleared in the store")
    page.gone('[data-testid="item-row"]')
    page.until(lambda d: page.text('[data-testid="count"]') == "0", "count 0")
    page.shot("cleared")


def test_add_item_and_read_only_python_value(state: shardstate.StateClient, page: Page) -> None:
    group = _group("add")
    state.set(group, "pyval", {1, 2, 3})  # a set has no JSON form
    state.set(group, "plain", "text")
    page.wait_count(group, 2)
    page.open_group(group)
    page.open_item("pyval")
    page.one('[data-testid="readonly"]')
    assert not any(e.is_displayed() for e in page.all('[data-testid="edit"], [data-testid="delete"]'))
    page.shot("python-read-only")

    page.click('[data-testid="add-item"]')
    page.type_into('[data-testid="add-key"]', "plain")  # exists: create-only refuses
    page.type_into('[data-testid="add-value"]', '{"x": 1}')
    page.click('[data-testid="add-create"]')
    page.until(lambda d: "already exists" in page.text('[data-testid="add-status"]'), "exists message")
    assert state.get(group, "plain") == "text"
    page.type_into('[data-testid="add-value"]', '{"x": ')
    page.until(lambda d: not page.one('[data-testid="add-create"]').is_enabled(), "create disabled")
    page.one('[data-testid="add-value"]').send_keys("1}")

    page.type_into('[data-testid="add-key"]', "fresh")
    page.click('[data-testid="add-create"]')
    page.one(page.item_row("fresh"))
    page.until(lambda d: state.get(group, "fresh") == {"x": 1}, "created in the store")
    page.wait_count(group, 3)
    page.shot("added")


def test_tree_paging_prefix_and_cluster_panel(state: shardstate.StateClient, page: Page) -> None:
    ns = _group("tree")
    for job in ("job-1", "job-2"):
        state.set(f"{ns}:{job}", "x", 1)
    for i in range(120):
        state.set(f"{ns}:job-1", f"item-{i:03d}", i)
    row = page.one(page.group_row(f"{ns}:job-1"))
    assert row.find_element(By.CSS_SELECTOR, ".label").text == "job-1"  # nested under its namespace
    page.one(f'[data-testid="tree-node"][data-path="{ns}"]')
    page.click(f'[data-testid="tree-toggle"][data-path="{ns}"]')  # collapse
    page.gone(page.group_row(f"{ns}:job-2"))
    page.click(f'[data-testid="tree-toggle"][data-path="{ns}"]')  # expand
    page.one(page.group_row(f"{ns}:job-2"))
    page.type_into('[data-testid="group-filter"]', "no-such-group")
    page.gone(page.group_row(f"{ns}:job-2"))
    page.type_into('[data-testid="group-filter"]', ns)
    page.one(page.group_row(f"{ns}:job-2"))

    page.open_group(f"{ns}:job-1")
    page.wait_count(f"{ns}:job-1", 121)
    page.until(lambda d: len(page.all('[data-testid="item-row"]')) == 50, "first page")
    first = page.keys()
    assert first == sorted(first)
    page.click('[data-testid="next-page"]')
    page.until(lambda d: page.keys()[:1] != first[:1], "page 2")
    second = page.keys()
    assert len(second) == 50
    assert first[-1] < second[0]  # the next keys in order, none repeated
    page.click('[data-testid="prev-page"]')
    page.until(lambda d: page.keys() == first, "back on page 1")
    state.set_many(f"{ns}:job-1", {f"item-000-{i:02d}": i for i in range(20)})  # live, at the top
    expected = sorted([f"item-000-{i:02d}" for i in range(20)] + first)[:50]
    page.until(lambda d: page.keys() == expected, "new keys in order, the page still 50 rows")
    page.click('[data-testid="next-page"]')  # the rows pushed off page 1 start page 2
    page.until(lambda d: page.keys()[:1] == [first[-20]], "page 2 after live inserts")
    page.click('[data-testid="prev-page"]')
    page.type_into('[data-testid="prefix"]', "item-11")
    page.until(lambda d: len(page.keys()) == 10, "prefix search")
    assert all(k.startswith("item-11") for k in page.keys())
    page.shot("paged")

    page.click('[data-testid="tab-cluster"]')
    page.until(lambda d: len(page.all('[data-testid="shard-row"]')) == len(state.shard_info()), "shard rows")
    page.until(lambda d: page.text('[data-testid="total-keys"]') not in ("", "0"), "total keys")
    page.shot("cluster")
