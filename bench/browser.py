"""Headless chromium through selenium: Debian's chromium and chromium-driver.

Shared by tests/test_page.py, bench/page.py and bench/screenshot.py. Selenium is imported
when a browser is started, so importing this module needs neither.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing() -> str | None:
    """Why no browser can be started here (None: it can)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if shutil.which(path) is None:
            return f"{name} is not at {path} (apt-get install chromium chromium-driver)"
    return None


def chromium(width: int = 1200, height: int = 800) -> Chrome:
    """A headless chromium of that window size; quit() it when done."""
    from selenium.webdriver import Chrome, ChromeOptions
    from selenium.webdriver.chrome.service import Service

    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MB
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    return Chrome(options=options, service=Service(CHROMEDRIVER))
