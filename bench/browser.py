"""Headless Chromium for the web console's browser test and page-load bench (Debian's ``chromium``
and ``chromium-driver``; ``make test`` installs them where they are missing)."""

from __future__ import annotations

import os

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: headless, no sandbox (root in CI), and none of Chromium's own network traffic (a closed network)
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
)


def browser_missing() -> str | None:
    """Why no browser can be started here, or None."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    return f"{CHROMIUM} / {CHROMEDRIVER} missing (apt-get install -y chromium chromium-driver)"


def headless_chromium(profile: str) -> WebDriver:
    """A new headless Chromium with its own profile folder ``profile``."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
