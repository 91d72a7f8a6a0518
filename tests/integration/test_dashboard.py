"""The agent's dashboard in a real browser (Debian's headless Chromium through chromedriver):
it loads without console errors, shows the VMs the test started, updates live when a clone
starts elsewhere, and its own buttons start a clone, make a live image and destroy a VM."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import Cli
from tests.integration.conftest import BaseImage, VmFactory
from vmstream.bench.browser import Browser


def _names(cli: Cli) -> set[str]:
    return {v["name"] for v in cli.json("list")}


def _until(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def _errors(browser: Browser) -> list[str]:
    return [m["message"] for m in browser.console() if m["level"] == "SEVERE"]


@pytest.fixture
def browser() -> Iterator[Browser]:
    with Browser() as b:
        pid = b.driver.service.process.pid
        yield b
    assert not Path(f"/proc/{pid}").exists(), "chromedriver left running"


def test_dashboard_shows_updates_and_acts(cli: Cli, base_image: BaseImage, vms: VmFactory, browser: Browser,
                                          tmp_path: Path) -> None:
    shown = vms.clones("base-img", count=2, prefix="dash")
    url, auth, _ = cli.agent()
    browser.open_dashboard(url, auth["Authorization"].removeprefix("Bearer "))
    for vm in shown:  # the VMs this test started, in the table and under their image in the tree
        browser.wait_for(f'tr[data-vm="{vm["name"]}"]')
        browser.wait_for(f'#image-base-img [data-clone="{vm["name"]}"]')
    row = browser.wait_for(f'tr[data-vm="{shown[0]["name"]}"]')
    assert "running" in row.text and "base-img" in row.text
    assert "#token" not in browser.driver.current_url, "the token is taken off the address bar"
    assert _errors(browser) == []

    # a clone started elsewhere (the CLI) appears without a reload
    (live,) = vms.clones("base-img", prefix="dash-live")
    browser.wait_for(f'tr[data-vm="{live["name"]}"]', timeout=20)
    assert browser.driver.execute_script("return performance.getEntriesByType('navigation').length") == 1

    # the page's own actions: start a clone of the image ...
    before = _names(cli)
    browser.fill('input[data-start-count="base-img"]', "1")
    browser.click('button[data-action="start"][data-image="base-img"]')
    _until(lambda: len(_names(cli) - before) == 1, "a clone started from the page")
    (started,) = _names(cli) - before
    vms.names.append(started)
    browser.wait_for(f'tr[data-vm="{started}"]', timeout=20)
    assert cli.json("show", started)["parent_image"] == "base-img"

    # ... make a live image of one of the VMs ...
    browser.fill("#capture-vm", shown[0]["name"])
    browser.fill("#capture-name", "dash-img")
    browser.click('#capture-form button[type="submit"]')
    try:
        _until(lambda: "dash-img" in {i["name"] for i in cli.json("live-image", "list")}, "a live image made from the page")
        browser.wait_for("#image-dash-img", timeout=20)
        assert cli.json("show", shown[0]["name"])["state"] == "running", "the VM runs on after its capture"

        # ... and destroy a VM (two clicks: the first asks to confirm)
        browser.click(f'button[data-action="destroy"][data-vm="{started}"]')
        assert browser.wait_for(f'button.confirm[data-vm="{started}"]', timeout=2).text == "Confirm?"
        assert started in _names(cli)
        browser.click(f'button.confirm[data-vm="{started}"]')
        _until(lambda: started not in _names(cli), "a VM destroyed from the page")
        vms.names.remove(started)
        _until(lambda: not browser.driver.find_elements("css selector", f'tr[data-vm="{started}"]'), "the row goes")
        browser.screenshot(tmp_path / "dashboard.png")
        assert _errors(browser) == []
    finally:
        cli.run("live-image", "delete", "dash-img")
