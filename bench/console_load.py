"""Web console page load with a group of 10,000 items (headless Chromium via Selenium). One run.

A 4-shard cluster gets a group of ``--items`` items (JSON documents of ~100 bytes) and its console
is started on a free port. Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) signs in
once, then loads ``/#g=<group>`` ``--loads`` times, each a fresh navigation from ``about:blank``.
A load is done when the items table shows its first page and the group's count reads the item
count; the time is taken from the page's own performance timeline (navigation start → the later of
the console's ``shardstate:items-shown`` and ``shardstate:groups-shown`` marks), and DOMContentLoaded
is reported beside it. For context, the two API calls behind it (``GET /api/v1/groups`` and the
first page of 50 items) are timed from Python too. Medians of the loads.

Writes ``bench/results/console_load.json``.

    python -m bench.console_load [--items 10000] [--loads 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import urllib.request
from typing import Any
from urllib.parse import quote

import ray
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import shardstate
from bench._common import report
from bench.browser import browser_missing, headless_chromium

CLUSTER = "bench-console"
GROUP = "console-load"
MARKS = ("shardstate:items-shown", "shardstate:groups-shown")


def fill(state: shardstate.StateClient, items: int) -> None:
    """``items`` JSON documents in GROUP, written in bulk batches."""
    batch = 1000
    for start in range(0, items, batch):
        values = {
            f"item-{i:06d}": {"id": i, "status": "done" if i % 3 else "new", "tags": ["a", "b"], "n": i * 7}
            for i in range(start, min(items, start + batch))
        }
        state.set_many(GROUP, values, returning="none")


def one_load(driver: WebDriver, url: str, items: int) -> dict[str, float]:
    """Navigate to the group's page and wait until its first page and count show; the timings (ms)."""
    driver.get("about:blank")
    driver.get(f"{url}#g={quote(GROUP)}")
    rows = '[data-testid="item-row"]'

    def shown(d: WebDriver) -> bool:
        count = d.find_elements(By.CSS_SELECTOR, '[data-testid="count"]')
        return bool(d.find_elements(By.CSS_SELECTOR, rows)) and bool(count) and count[0].text == str(items)

    WebDriverWait(driver, 60, poll_frequency=0.05).until(shown, "first page and count")
    timing = driver.execute_script(
        """
        const nav = performance.getEntriesByType('navigation')[0];
        const at = (name) => {
            const m = performance.getEntriesByName(name, 'mark');
            return m.length ? m[0].startTime : null;
        };
        return {dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd,
                items: at(arguments[0]), groups: at(arguments[1]),
                rows: document.querySelectorAll('[data-testid="item-row"]').length};
        """,
        *MARKS,
    )
    if timing["items"] is None or timing["groups"] is None:
        raise RuntimeError(f"the console set no performance marks: {timing}")
    return {
        "ready_ms": float(max(timing["items"], timing["groups"])),
        "dom_content_loaded_ms": float(timing["dcl"]),
        "rows": timing["rows"],
    }


def api_ms(url: str, token: str, path: str, repeats: int) -> float:
    """Median wall time (ms) of ``GET path`` with the bearer token."""
    samples = []
    for _ in range(repeats):
        request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--out", default="bench/results/console_load.json")
    args = parser.parse_args(argv)
    missing = browser_missing()
    if missing is not None:
        print(missing)
        return 1

    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # its own Ray, never another's
    storage = tempfile.mkdtemp(prefix="bench-console-")
    state = shardstate.connect(cluster=CLUSTER, shards=4, storage=storage)
    driver: WebDriver | None = None
    try:
        state.clear(GROUP)
        started = time.perf_counter()
        fill(state, args.items)
        fill_s = time.perf_counter() - started
        assert state.group_counts()[GROUP] == args.items
        info = state.start_console(port=0)
        url = info.url.rstrip("/") + "/"
        with tempfile.TemporaryDirectory(prefix="bench-console-chromium-") as profile:
            driver = headless_chromium(profile)
            driver.get(f"{url}?token={info.token}")  # sign in (sets the cookie); not measured
            WebDriverWait(driver, 60).until(
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
            )
            loads = [one_load(driver, url, args.items) for _ in range(args.loads)]
            driver.quit()
            driver = None
        base = url.rstrip("/")
        groups_ms = api_ms(base, info.token, "/api/v1/groups", args.loads)
        page_ms = api_ms(base, info.token, f"/api/v1/groups/{quote(GROUP)}/items?limit=50", args.loads)
        rows: list[dict[str, Any]] = [
            {
                "load": i + 1,
                "ready ms": r["ready_ms"],
                "DOMContentLoaded ms": r["dom_content_loaded_ms"],
                "rows shown": r["rows"],
            }
            for i, r in enumerate(loads)
        ]
        median_ready = statistics.median(r["ready_ms"] for r in loads)
        median_dcl = statistics.median(r["dom_content_loaded_ms"] for r in loads)
        rows.append(
            {
                "load": "median",
                "ready ms": median_ready,
                "DOMContentLoaded ms": median_dcl,
                "rows shown": loads[0]["rows"],
            }
        )
        report(
            f"Web console page load, a group of {args.items:,} items (headless Chromium, {args.loads} loads)",
            rows,
            args.out,
            {
                "items": args.items,
                "loads": args.loads,
                "median_ready_ms": median_ready,
                "median_dom_content_loaded_ms": median_dcl,
                "api_groups_median_ms": groups_ms,
                "api_first_page_median_ms": page_ms,
                "fill_s": fill_s,
            },
        )
        print(
            f"API from Python (median of {args.loads}): GET /api/v1/groups {groups_ms:.1f} ms, "
            f"first page of 50 items {page_ms:.1f} ms"
        )
    finally:
        if driver is not None:
            driver.quit()
        shardstate.shutdown(CLUSTER)
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
