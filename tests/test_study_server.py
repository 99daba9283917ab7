"""The study's HTTP API through Starlette's test client: tokens, votes, escaping, path traversal; and a
small run of the load test on loopback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from ncppo.study.create import create_study, open_study
from ncppo.study.server import create_app
from tests.study_helpers import fake_generation

EVIL = '<img src=x onerror="alert(1)"> & </script><script>alert(2)</script>'


@pytest.fixture
def app(tmp_path):
    prompts = ["a red circle on a blue background", EVIL]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200))
    store = create_study(a, b, tmp_path / "study", votes_per_item=2)
    (tmp_path / "secret.png").write_bytes(b"not for annotators")
    token = store.invite(1)[0]
    return TestClient(create_app(tmp_path / "study")), store, token


def _vote(client, token, assignment_id, client_id="c1", **answers):
    body = {"token": token, "assignment_id": assignment_id, "client_id": client_id,
            "q1": "left", "q2": "right", "q3": "tie", **answers}
    return client.post("/api/vote", json=body)


def test_next_vote_and_idempotent_retry(app):
    client, store, token = app
    item = client.get("/api/next", params={"token": token}).json()
    assert item["done"] is False and item["left"].startswith("/img/")
    assert client.get(item["left"]).headers["content-type"] == "image/png"
    first = _vote(client, token, item["assignment_id"])
    retry = _vote(client, token, item["assignment_id"])
    assert first.json() == {"ok": True, "duplicate": False} and retry.json() == {"ok": True, "duplicate": True}
    assert len(open_study(store.path.parent).votes()) == 1
    nxt = client.get("/api/next", params={"token": token}).json()
    assert nxt["assignment_id"] != item["assignment_id"] and nxt["progress"]["judged_by_you"] == 1
    _vote(client, token, nxt["assignment_id"], client_id="c2")
    assert client.get("/api/next", params={"token": token}).json()["done"] is True


def test_tokens_are_checked(app):
    client, store, token = app
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", params={"token": "forged"}).status_code == 403
    assert client.get("/").status_code == 401 and client.get("/?token=forged").status_code == 403
    assert client.get("/", params={"token": token}).status_code == 200
    item = client.get("/api/next", params={"token": token}).json()
    assert _vote(client, "forged", item["assignment_id"]).status_code == 403
    assert client.get("/admin/results").status_code == 401
    assert client.get("/admin/results", params={"admin_token": token}).status_code == 403
    admin = store.meta("admin_token")
    assert client.get("/admin/results", params={"admin_token": admin}).json()["items"] == 2
    invites = client.get("/admin/invites", params={"admin_token": admin}).json()
    assert invites == [{"name": "annotator-1", "link": f"/?token={token}"}]


def test_bad_requests_get_4xx_with_a_message(app):
    client, _, token = app
    item = client.get("/api/next", params={"token": token}).json()
    cases = [
        client.post("/api/vote", content=b"{not json"),
        client.post("/api/vote", json=[1, 2]),
        client.post("/api/vote", json={"token": token, "assignment_id": "7", "client_id": "x"}),
        _vote(client, token, item["assignment_id"], q1="both"),
        _vote(client, token, item["assignment_id"], client_id=""),
        _vote(client, token, 99999),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500 and response.json()["error"], response.text


def test_prompts_are_escaped(app):
    client, store, token = app
    page = client.get("/", params={"token": token}).text
    assert "onerror" not in page and "alert(" not in page  # prompts never enter the HTML
    assert "textContent = data.prompt" in page and "innerHTML" not in page
    prompts = set()
    for _ in range(2):
        item = client.get("/api/next", params={"token": token}).json()
        prompts.add(item["prompt"])
        _vote(client, token, item["assignment_id"], client_id=str(item["assignment_id"]))
    assert EVIL in prompts  # delivered intact as JSON data, displayed as text by the page


@pytest.mark.parametrize("path", ["/img/../secret.png", "/img/..%2F..%2Fsecret.png", "/img/%2e%2e/secret.png",
                                  "/img/../../study/study.sqlite", "/img/{name}/../../secret.png", "/img/{name}%2F..%2F..%2Fsecret.png",
                                  "/img/nothere.png", "/img/study.sqlite", "/images/../secret.png", "/images/{name}"])
def test_images_cannot_escape_the_study(app, path):
    client, _, token = app
    name = client.get("/api/next", params={"token": token}).json()["left"].split("?")[0].rsplit("/", 1)[1]
    response = client.get(path.format(name=name), params={"token": token})
    assert response.status_code == 404 and b"not for annotators" not in response.content


def test_a_small_load_run(tmp_path):
    """benchmarks/study_load.py at a small scale: concurrent annotators, retried votes, blind images."""
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "benchmarks/study_load.py", "--annotators", "4", "--votes", "6", "--out", str(out)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["votes_in_db"] == 24 and result["errors"] == []
    assert result["latency_ms"]["image"]["median"] > 0


def test_undo_and_done_through_the_api(app):
    client, store, token = app
    assert client.post("/api/undo", json={"token": token}).status_code == 409  # nothing to undo yet
    assert client.post("/api/undo", json={}).status_code == 401
    item = client.get("/api/next", params={"token": token}).json()
    _vote(client, token, item["assignment_id"], q1="right")
    undone = client.post("/api/undo", json={"token": token}).json()
    assert undone["assignment_id"] == item["assignment_id"] and undone["left"] == item["left"]
    assert undone["answers"] == {"q1": "right", "q2": "right", "q3": "tie"} and undone["progress"]["judged_by_you"] == 0
    assert _vote(client, token, item["assignment_id"], client_id="c1").status_code == 409  # the undone answer
    for k in range(2):
        nxt = client.get("/api/next", params={"token": token}).json()
        assert _vote(client, token, nxt["assignment_id"], client_id=f"again{k}").status_code == 200
    done = client.get("/api/next", params={"token": token}).json()
    assert done["done"] is True and done["waiting"] is False and done["retry_after_s"] > 0


def test_the_page_carries_the_instructions_as_text(tmp_path):
    prompts = ["a red circle"]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200))
    (tmp_path / "howto.txt").write_text(f"Judge carefully.\n\nNever {EVIL}\n")
    token = create_study(a, b, tmp_path / "study", instructions=tmp_path / "howto.txt").invite(1)[0]
    page = TestClient(create_app(tmp_path / "study")).get("/", params={"token": token}).text
    assert "Judge carefully." in page and "</script><script>alert(2)" not in page  # JSON inside the script
    assert "\\u003c/script>\\u003cscript>alert(2)" in page
