"""A real browser (Debian's headless chromium, driven by Playwright) answers items with clicks and with
the keyboard; the votes must appear in the study's database. The page runs under its Content-Security-
Policy (no violation), shows the images by their blind, token-scoped URLs, and starts every question
neutral: no image marked by the last answer, no button holding the focus (Enter must not answer)."""

import re
import shutil
import time

import pytest

from ncppo.study.create import create_study, open_study
from ncppo.study.server import running_server
from tests.study_helpers import fake_generation

EVIL = '<img src=x onerror="alert(1)">'


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser test needs Debian's chromium package (`make test` installs it when run as root)")
    return path


def _wait_until(page, js: str, seconds: float = 10) -> None:
    """Poll ``js`` with ``page.evaluate`` (wait_for_function evaluates strings in the page: the CSP forbids that)."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


def test_annotating_in_a_real_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    prompts = ["a red circle on a blue background", EVIL, "a green square on a white background"]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200))
    store = create_study(a, b, tmp_path / "study", votes_per_item=1)
    token = store.invite(1)[0]
    dialogs, errors = [], []
    with running_server(tmp_path / "study") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: m.type == "error" and "favicon" not in m.location.get("url", "")
                and errors.append(f"{m.text} {m.location}"))  # CSP violations land here
        page.on("pageerror", lambda e: errors.append(str(e)))
        response = page.goto(f"{url}/?token={token}")
        assert "script-src 'nonce-" in response.headers["content-security-policy"]
        _wait_until(page, "['left', 'right'].every(id => document.getElementById(id).naturalWidth > 0)")
        for side in ("left", "right"):  # blind names, fetched with the annotator's token
            assert re.fullmatch(r"/img/[A-Za-z0-9_-]{22}\.png\?token=" + re.escape(token),
                                page.get_attribute(f"#{side}", "src"))
        borders = "['left', 'right'].map(id => getComputedStyle(document.getElementById(id)).borderTopColor)"
        neutral = page.evaluate(borders)
        focused = "document.activeElement.tagName"
        seen_prompts = []
        # item 1 with clicks: left, tie, right
        expect(page.get_by_test_id("question")).to_contain_text("Q1")
        seen_prompts.append(page.get_by_test_id("prompt").text_content())
        page.click("#answer-left")
        expect(page.get_by_test_id("question")).to_contain_text("Q2")
        assert page.locator("#prompt").evaluate("e => getComputedStyle(e).visibility") == "hidden"  # Q2: no prompt
        assert page.evaluate(borders) == neutral  # the left image is not marked while Q2 is asked
        assert page.evaluate(focused) != "BUTTON"  # the Left button let go of the focus
        page.keyboard.press("Enter")
        page.keyboard.press(" ")
        page.wait_for_timeout(150)
        expect(page.get_by_test_id("question")).to_contain_text("Q2")  # Enter and Space answered nothing
        page.click("#answer-tie")
        assert page.evaluate(borders) == neutral and page.evaluate(focused) != "BUTTON"
        page.click("#answer-right")
        expect(page.get_by_test_id("progress")).to_contain_text("You have judged 1 item")
        # item 2: the Right button clicked last must not answer it on Enter
        expect(page.get_by_test_id("question")).to_contain_text("Q1")
        assert page.evaluate(borders) == neutral and page.evaluate(focused) != "BUTTON"
        page.keyboard.press("Enter")
        page.wait_for_timeout(150)
        expect(page.get_by_test_id("question")).to_contain_text("Q1")
        # item 2 with the keyboard: right, tie, left (a held key answers once)
        seen_prompts.append(page.get_by_test_id("prompt").text_content())
        page.keyboard.down("ArrowRight")
        page.keyboard.down("ArrowRight")  # auto-repeat while held
        page.keyboard.up("ArrowRight")
        expect(page.get_by_test_id("question")).to_contain_text("Q2")
        for key in ("2", "ArrowLeft"):
            page.keyboard.press(key)
        expect(page.get_by_test_id("progress")).to_contain_text("You have judged 2 item")
        seen_prompts.append(page.get_by_test_id("prompt").text_content())
        for key in ("1", "1", "1"):
            page.keyboard.press(key)
        expect(page.get_by_test_id("status")).to_contain_text("All done")
        browser.close()
    votes = open_study(tmp_path / "study").votes()
    assert [(v["q1"], v["q2"], v["q3"]) for v in votes] == [("left", "tie", "right"), ("right", "tie", "left"),
                                                             ("left", "left", "left")]
    assert sorted(seen_prompts) == sorted(prompts) and EVIL in seen_prompts  # shown as text, exactly
    assert dialogs == []  # the prompt's markup never ran
    assert errors == []  # no Content-Security-Policy violation, no script error
