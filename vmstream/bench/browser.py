"""Debian's Chromium, headless, driven through Debian's chromedriver by Selenium: the
dashboard's screenshots (vmstream bench dashboard) and its browser test.

Nothing is downloaded: the browser and its driver are Debian's packages (installed with
apt-get when missing, as root), and Selenium is given the driver's path, so its own
driver manager never runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vmstream.errors import VmstreamError

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")


class BrowserError(VmstreamError):
    pass


def ensure_browser(progress: Callable[[str], None] = lambda _: None) -> None:
    """Debian's chromium and chromium-driver, installed if missing (root only)."""
    from vmstream.openstack.deploy.packages import install, missing_packages

    missing = missing_packages(PACKAGES)
    if missing:
        if os.geteuid() != 0:
            raise BrowserError(f"the dashboard's browser is not installed: apt-get install {' '.join(missing)} (as root)")
        progress(f"installing {' '.join(missing)} (Debian's packages)")
        install(missing, Path("/tmp/vmstream-apt.log"), progress)


class Browser:
    """One headless Chromium window; quit (browser and driver) when the block ends, however it ends."""

    def __init__(self, width: int = 1500, height: int = 1000) -> None:
        self.size = (width, height)
        self.driver: Any = None

    def __enter__(self) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
            raise BrowserError(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install {' '.join(PACKAGES)}")
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                    "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                    f"--window-size={self.size[0]},{self.size[1]}"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.driver is None:
            return
        ours = _descendants(self.driver.service.process.pid) | {self.driver.service.process.pid}
        try:
            self.driver.quit()  # the browser's processes and the driver
        finally:
            self.driver = None
            deadline = time.monotonic() + 5
            while (left := {pid for pid in ours if _alive(pid)}) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in left:  # what quit left behind: ours, by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def open_dashboard(self, agent_url: str, token: str) -> None:
        """The agent's dashboard, with the token in the address's fragment (never sent to the server)."""
        self.driver.get(f"{agent_url}/dashboard#token={token}")

    def wait_for(self, css: str, timeout: float = 30.0) -> Any:
        """The first element matching css once there is one."""
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + timeout
        while True:
            found = self.driver.find_elements(By.CSS_SELECTOR, css)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise BrowserError(f"nothing matched {css!r} on the page in {timeout:.0f} s")
            time.sleep(0.1)

    def click(self, css: str, timeout: float = 30.0) -> None:
        """Click the element matching css; found again if the page redrew it in between (live updates do)."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(10):
            try:
                self.wait_for(css, timeout).click()
                return
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise BrowserError(f"{css!r} kept being redrawn: could not click it")

    def fill(self, css: str, value: str, timeout: float = 30.0) -> None:
        """Set an input's value as typing would, in one step (no redraw can come between)."""
        self.wait_for(css, timeout)
        self.driver.execute_script("const e = document.querySelector(arguments[0]); e.value = arguments[1];"
                                   "e.dispatchEvent(new Event('input', {bubbles: true}));", css, value)

    def console(self) -> list[dict[str, Any]]:
        """The page's console messages since the last call."""
        logs: list[dict[str, Any]] = self.driver.get_log("browser")
        return logs

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(root: int) -> set[int]:
    """Every process under root (chromedriver: the browser and its helpers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
