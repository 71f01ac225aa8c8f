"""The HTML report in a real browser: headless Chromium loads the page of a zoo model with no console
message, the page's own self-check (every region and reason of its data on the page) passes, and a
screenshot is taken. ``.ci/run`` installs Debian's ``chromium`` where it is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import made_up_report

from branchfold import fold_with_report
from branchfold.zoo import ZOO

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs it)")


def chromium(page: Path, tmp_path: Path, *flags: str, fragment: str = "") -> tuple[str, list[str]]:
    """Load ``page`` (with ``#fragment``) headless; return stdout and the console messages Chromium logged."""
    profile = tmp_path / "profile"  # one profile per run: parallel test workers never share a lock
    url = page.as_uri() + (f"#{fragment}" if fragment else "")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *flags, url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def selfcheck(dom: str) -> str:
    found = re.search(r'<body[^>]*data-selfcheck="([^"]*)"', dom)
    assert found, "the page's script did not run"
    return found.group(1)


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    entry = ZOO["repvgg"]
    model = entry.build().eval()
    report = fold_with_report(model, entry.example_input(model, 2)).report
    path = tmp_path_factory.mktemp("page") / "repvgg.html"
    path.write_text(report.to_html("branchfold: repvgg"), encoding="utf-8")
    return path


def test_the_page_loads_without_console_errors_and_checks_itself(page_file, tmp_path):
    dom, console = chromium(page_file, tmp_path, "--dump-dom")
    assert console == []
    assert selfcheck(dom) == "ok"
    assert "data-jserror" not in dom.split(">", 2)[1]


def test_a_screenshot_of_the_page(page_file, tmp_path):
    shot = tmp_path / "repvgg.png"
    chromium(page_file, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 1600)


def test_the_self_check_and_the_console_catch_a_broken_page(page_file, tmp_path):
    """The checks above can fail: a page missing a region, and a script error, are both seen."""
    html = page_file.read_text(encoding="utf-8")
    broken = re.sub(r'<article class="card region" id="group-0".*?</article>', "", html, count=1, flags=re.S)
    broken = broken.replace("</main>", "</main><script>notDefined();</script>")
    bad = tmp_path / "broken.html"
    bad.write_text(broken, encoding="utf-8")
    dom, console = chromium(bad, tmp_path, "--dump-dom")
    assert selfcheck(dom).startswith("failed: regions on the page")
    assert any("notDefined" in line for line in console)


def test_a_link_filters_the_page_by_reason(tmp_path):
    page = tmp_path / "made_up.html"
    page.write_text(made_up_report().to_html(), encoding="utf-8")
    dom, console = chromium(page, tmp_path, "--dump-dom", fragment="reason=broadcast")
    assert console == [] and selfcheck(dom) == "ok"
    sections = re.findall(r'<details class="reason([^"]*)" id="[^"]*" data-reason="([^"]*)"', dom)
    assert len(sections) == 4  # broadcast, padding-border, and the two undone
    assert {reason for cls, reason in sections if "hidden" not in cls} == {"broadcast"}
    assert re.search(r'<article class="card region hidden"', dom)  # regions hidden while a reason is chosen
