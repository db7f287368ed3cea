"""One browser test's page: the driver, the server it talks to, screenshots, the console."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DEEPWORK_ARTIFACTS") or ROOT / ".artifacts" / "browser")
"""Where every test's screenshots go (git-ignored by default)."""
DOCS_SCREENSHOTS = os.environ.get("DEEPWORK_DOCS_SCREENSHOTS")
"""When set (``docs/img/dashboard``), the named screenshots of one adapter's run go there too."""
DOCS_ADAPTER = "starlette"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:150]


MAX_HEIGHT = 4000
"""CSS pixels: a whole page is captured up to this height."""


def full_page_png(driver: Any) -> bytes:
    """A screenshot of the whole page, not only the window's view of it (Chromium's CDP)."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    clip = {
        "x": 0,
        "y": 0,
        "width": max(1, int(size["width"])),
        "height": max(1, min(MAX_HEIGHT, int(size["height"]))),
        "scale": 1,
    }
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    return base64.b64decode(shot["data"])


class Console:
    """The browser console's messages since the last read, and the ones a test expects."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        # The browser asks the host's root for /favicon.ico: not the dashboard's.
        self.allowed: list[re.Pattern[str]] = [re.compile(r"/favicon\.ico - ")]
        self.seen: list[dict[str, Any]] = []

    def allow(self, pattern: str) -> None:
        """Let an error matching ``pattern`` pass (a refusal the test provokes)."""
        self.allowed.append(re.compile(pattern))

    def read(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.driver.get_log("browser")
        self.seen.extend(entries)
        return entries

    def problems(self) -> list[str]:
        self.read()
        found = []
        for entry in self.seen:
            message = str(entry.get("message", ""))
            if "Content Security Policy" in message or "Content-Security-Policy" in message:
                found.append(f"CSP violation: {message}")
            elif entry.get("level") == "SEVERE" and not any(
                p.search(message) for p in self.allowed
            ):
                found.append(f"console error: {message}")
        return found


class Page:
    """One test's view of the browser: the driver, the server, screenshots, the console."""

    def __init__(self, driver: Any, base: str, adapter: str, name: str) -> None:
        self.driver = driver
        self.base = base
        self.adapter = adapter
        self.name = name
        self.console = Console(driver)
        self.console.read()  # what earlier tests left behind is theirs

    def shot(self, label: str) -> Path:
        """Save a named screenshot (and the docs' copy from the Starlette run, when asked)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.adapter}-{slug(label)}.png"
        path.write_bytes(full_page_png(self.driver))
        if DOCS_SCREENSHOTS and self.adapter == DOCS_ADAPTER:
            docs = Path(DOCS_SCREENSHOTS)
            if not docs.is_absolute():
                docs = ROOT / docs
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, docs / f"{slug(label)}.png")
        return path
