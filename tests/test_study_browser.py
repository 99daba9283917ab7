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
        expect(page.get_by_test_id("finished-title")).to_contain_text("All done")
        browser.close()
    votes = open_study(tmp_path / "study").votes()
    assert [(v["q1"], v["q2"], v["q3"]) for v in votes] == [("left", "tie", "right"), ("right", "tie", "left"),
                                                             ("left", "left", "left")]
    assert sorted(seen_prompts) == sorted(prompts) and EVIL in seen_prompts  # shown as text, exactly
    assert dialogs == []  # the prompt's markup never ran
    assert errors == []  # no Content-Security-Policy violation, no script error


VISIBLE_BUTTONS = "[...document.querySelectorAll('button')].filter(b => b.offsetParent !== null).length"
VISIBLE_IMAGES = "[...document.querySelectorAll('img')].filter(i => i.offsetParent !== null).length"


def test_undo_zoom_gold_instructions_and_the_finished_page(tmp_path):
    """Issue 18's study items in the browser: the organisers' instructions; images that open at full size (and
    block answers while open); undo within an item and of the last submitted answer; a gold item among the
    items; "nothing available right now" while another annotator holds the last item; a finished page without
    images or buttons."""
    from playwright.sync_api import expect, sync_playwright

    from tests.study_helpers import fake_gold

    prompts = [f"prompt {k}" for k in range(4)]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0), size=900)
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200), size=900)
    (tmp_path / "howto.txt").write_text("Look at the whole image.\n\nQ2 has no prompt: judge the looks alone.\n")
    store = create_study(a, b, tmp_path / "study", votes_per_item=1, instructions=tmp_path / "howto.txt",
                         gold=fake_gold(tmp_path / "g", 1, size=900))
    token, other = store.invite(2)
    held = store.next_assignment(other)  # another annotator holds one item until the end
    errors = []
    with running_server(tmp_path / "study") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("console", lambda m: m.type == "error" and "favicon" not in m.location.get("url", "")
                and errors.append(f"{m.text} {m.location}"))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/?token={token}")
        _wait_until(page, "['left', 'right'].every(id => document.getElementById(id).naturalWidth > 0)")
        paragraphs = page.locator("#instructions p").all_text_contents()
        assert paragraphs == ["Look at the whole image.", "Q2 has no prompt: judge the looks alone."]
        question = page.get_by_test_id("question")
        # zoom: the page shows the 900 px image smaller; a click shows it at its own size, and no key answers
        shown = page.evaluate("document.getElementById('left').getBoundingClientRect().width")
        assert shown < 900
        page.click("#left")
        expect(page.get_by_test_id("zoom")).to_be_visible()
        assert page.evaluate("document.getElementById('zoom-img').getBoundingClientRect().width") == 900
        expect(page.locator("#zoom-caption")).to_contain_text("900 x 900 px")
        page.keyboard.press("1")
        page.keyboard.press("Escape")
        expect(page.get_by_test_id("zoom")).to_be_hidden()
        expect(question).to_contain_text("Q1")  # the key pressed while zoomed answered nothing
        page.click("#right")
        page.click("#zoom")  # a click anywhere closes it
        expect(page.get_by_test_id("zoom")).to_be_hidden()
        # undo inside an item: back one question
        first_left = page.get_attribute("#left", "src")
        assert page.is_disabled("#undo")  # nothing to undo yet
        page.click("#answer-right")
        expect(question).to_contain_text("Q2")
        page.click("#undo")
        expect(question).to_contain_text("Q1")
        assert page.evaluate("document.activeElement.tagName") != "BUTTON"
        for key in ("1", "2", "3"):
            page.keyboard.press(key)
        expect(page.get_by_test_id("progress")).to_contain_text("You have judged 1 item")
        # undo of the submitted answer (Backspace): the same item comes back at its last question
        expect(question).to_contain_text("Q1")
        assert page.get_attribute("#left", "src") != first_left
        page.keyboard.press("Backspace")
        expect(page.get_by_test_id("status")).to_contain_text("Undone")
        expect(question).to_contain_text("Q3")
        assert page.get_attribute("#left", "src") == first_left
        expect(page.get_by_test_id("progress")).to_contain_text("You have judged 0 item")
        page.keyboard.press("1")  # a new answer to Q3
        expect(page.get_by_test_id("progress")).to_contain_text("You have judged 1 item")
        for judged in (2, 3, 4):  # two regular items and the gold one
            for key in ("1", "1", "1"):
                page.keyboard.press(key)
            expect(page.get_by_test_id("progress")).to_contain_text(f"You have judged {judged} item")
        # the last item is held by the other annotator: nothing for now, and a page that says so
        expect(page.get_by_test_id("finished-title")).to_have_text("Nothing available right now")
        assert page.evaluate(VISIBLE_BUTTONS) == 0 and page.evaluate(VISIBLE_IMAGES) == 0
        store.submit(other, held.id, "other-1", {"q1": "tie", "q2": "tie", "q3": "tie"})
        page.reload()
        expect(page.get_by_test_id("finished-title")).to_have_text("All done. Thank you!")
        # finished: no images (so no broken-image icons), no buttons, no question left on screen
        assert page.evaluate(VISIBLE_BUTTONS) == 0 and page.evaluate(VISIBLE_IMAGES) == 0
        assert not page.get_by_test_id("question").is_visible()
        browser.close()
    mine = [v for v in open_study(tmp_path / "study").votes() if v["annotator_name"] == "annotator-1"]
    assert (mine[0]["q1"], mine[0]["q2"], mine[0]["q3"]) == ("left", "tie", "left")  # Q3 as answered after the undo
    assert len(mine) == 4 and sum(v["gold"] for v in mine) == 1
    assert [u["q3"] for u in open_study(tmp_path / "study").undone()] == ["right"]
    from ncppo.study.results import study_results

    checks = study_results(open_study(tmp_path / "study"), n_boot=10)["annotators"]["annotator-1"]
    assert checks["gold_answers"] == 3 and checks["gold_accuracy"] in (0.0, 1.0)  # "left" on all three
    assert errors == []
