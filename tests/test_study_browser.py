"""A real browser (Debian's headless chromium, driven by Playwright) answers items with clicks and with
the keyboard; the votes must appear in the study's database."""

import shutil

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


def test_annotating_in_a_real_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    prompts = ["a red circle on a blue background", EVIL, "a green square on a white background"]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200))
    store = create_study(a, b, tmp_path / "study", votes_per_item=1)
    token = store.invite(1)[0]
    dialogs = []
    with running_server(tmp_path / "study") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{url}/?token={token}")
        seen_prompts = []
        # item 1 with clicks: left, tie, right
        expect(page.get_by_test_id("question")).to_contain_text("Q1")
        seen_prompts.append(page.get_by_test_id("prompt").text_content())
        page.click("#answer-left")
        expect(page.get_by_test_id("question")).to_contain_text("Q2")
        assert page.locator("#prompt").evaluate("e => getComputedStyle(e).visibility") == "hidden"  # Q2: no prompt
        page.click("#answer-tie")
        page.click("#answer-right")
        expect(page.get_by_test_id("progress")).to_contain_text("You have judged 1 item")
        # item 2 with the keyboard: right, tie, left
        seen_prompts.append(page.get_by_test_id("prompt").text_content())
        for key in ("ArrowRight", "2", "ArrowLeft"):
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
