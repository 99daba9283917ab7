"""Fault reproductions for the study (issue 12 "Nothing lost, nobody let in"): a study that is not blind,
manifests that name files outside the generation folder, a server that reads any body and answers odd
input with 500s, tokens in the access log, missing security headers, and a kill inside ``study create``."""

import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from starlette.testclient import TestClient

from ncppo.cli import main
from ncppo.errors import UsageError
from ncppo.study.create import create_study, open_study
from ncppo.study.server import MAX_BODY, create_app, running_server
from ncppo.study.store import IncompleteStudyError, StudyStore
from tests.study_helpers import fake_generation

ROOT = Path(__file__).parents[1]
ANSWER = {"q1": "left", "q2": "tie", "q3": "right"}
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nfake key for a test\n-----END OPENSSH PRIVATE KEY-----\n"


def _study(tmp_path, n=2, votes=2, name="study"):
    prompts = [f"prompt {i}" for i in range(n)]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200))
    store = create_study(a, b, tmp_path / name, votes_per_item=votes)
    return store, store.invite(1)[0]


def _client(folder):
    return TestClient(create_app(folder), raise_server_exceptions=False)


def _name(url):
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[1]


# -- blind -----------------------------------------------------------------------------------------------
def test_image_names_say_nothing_of_the_model(tmp_path):
    store, token = _study(tmp_path, n=4, votes=1)
    client = _client(tmp_path / "study")
    served = {}
    while not (item := client.get("/api/next", params={"token": token}).json())["done"]:
        for side in ("left", "right"):
            response = client.get(item[side])
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            assert "last-modified" not in response.headers and "etag" not in response.headers  # no copy times
            red = np.asarray(Image.open(io.BytesIO(response.content)))[0, 0, 0] > 100
            served[_name(item[side])] = "A" if red else "B"  # only the pixels say which model made it
        client.post("/api/vote", json={"token": token, "assignment_id": item["assignment_id"],
                                       "client_id": str(item["assignment_id"]), **ANSWER})
    on_disk = sorted(p.name for p in (tmp_path / "study" / "images").iterdir())
    assert sorted(served) == on_disk and len(on_disk) == 8
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}\.png", n) for n in on_disk)
    assert not any(re.search(r"item\d|-[ab]\.png|p\d{5}", n) for n in on_disk)
    assert {i["image_a"]: "A" for i in store.items()} == {n: s for n, s in served.items() if s == "A"}
    again, _ = _study(tmp_path, n=4, votes=1, name="again")  # same inputs, other names: random, not derived
    assert not {i["image_a"] for i in again.items()} & set(on_disk)


def test_images_are_served_only_to_the_annotator_of_their_item(tmp_path):
    store, token = _study(tmp_path)
    other = store.invite(1)[0]
    client = _client(tmp_path / "study")
    item = client.get("/api/next", params={"token": token}).json()
    path = urllib.parse.urlsplit(item["left"]).path
    assert client.get(item["left"]).status_code == 200
    assert client.get(path).status_code == 401  # no token
    assert client.get(path, params={"token": "forged"}).status_code == 403
    assert client.get(path, params={"token": other}).status_code == 404  # a real annotator, not of this item
    unassigned = {i["image_a"] for i in store.items()} - {_name(item["left"]), _name(item["right"])}
    assert client.get(f"/img/{unassigned.pop()}", params={"token": token}).status_code == 404
    assert client.get(f"/images/{_name(item['left'])}").status_code == 404  # the old open route is gone


def test_png_metadata_does_not_reach_annotators(tmp_path):
    a = fake_generation(tmp_path / "a", ["p"], (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["p"], (0, 0, 200))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "model: secret-model-B")
    info.add_itxt("Comment", "secret-model-B lora")
    pixels = np.asarray(Image.open(b / "images" / "p00000-i00.png"))
    Image.fromarray(pixels).save(b / "images" / "p00000-i00.png", pnginfo=info)
    assert b"secret-model-B" in (b / "images" / "p00000-i00.png").read_bytes()
    store = create_study(a, b, tmp_path / "study", votes_per_item=1)
    copied = (tmp_path / "study" / "images" / store.items()[0]["image_b"]).read_bytes()
    assert b"secret-model-B" not in copied and b"tEXt" not in copied and b"iTXt" not in copied
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(copied))), pixels)


# -- manifest paths ----------------------------------------------------------------------------------
def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["absolute", "dotdot", "dotdot-deeper", "symlink-out", "symlinked-folder-out",
                                  "not-an-image", "directory", "missing", "too-many-pixels", "bomb", "gif"])
def test_create_takes_only_images_inside_the_generation_folder(tmp_path, case):
    secret = tmp_path / "id_rsa"
    secret.write_text(KEY)
    a = fake_generation(tmp_path / "a", ["p0", "p1"], (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["p0", "p1"], (0, 0, 200))
    images = b / "images"
    path = {"absolute": str(secret), "dotdot": "../id_rsa", "dotdot-deeper": "images/../../id_rsa",
            "symlink-out": "images/key.png", "symlinked-folder-out": "outside/id_rsa", "not-an-image": "images/notes.png",
            "directory": "images", "missing": "images/nothere.png", "too-many-pixels": "images/big.png",
            "bomb": "images/bomb.png", "gif": "images/anim.png"}[case]
    if case == "symlink-out":
        (images / "key.png").symlink_to(secret)
    if case == "symlinked-folder-out":
        (b / "outside").symlink_to(tmp_path)
    if case == "not-an-image":
        (images / "notes.png").write_text(KEY)
    if case == "too-many-pixels":
        _png_header_only(images / "big.png", 5000, 5000)
    if case == "bomb":
        _png_header_only(images / "bomb.png", 60000, 60000)
    if case == "gif":
        Image.new("RGB", (8, 8)).save(images / "anim.png", format="GIF")
    rows = [json.loads(line) for line in (b / "manifest.jsonl").read_text().splitlines()]
    rows[1]["path"] = path
    (b / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError) as err:
        create_study(a, b, tmp_path / "study")
    message = str(err.value)
    assert f"{b.resolve() / 'manifest.jsonl'}, row 2: image {path!r}" in message, message
    expected = {"absolute": "absolute", "dotdot": "outside the generation folder",
                "dotdot-deeper": "outside the generation folder", "symlink-out": "outside the generation folder",
                "symlinked-folder-out": "outside the generation folder", "not-an-image": "not a PNG, JPEG or WebP",
                "directory": "not a regular file", "missing": "does not exist", "too-many-pixels": "pixels",
                "bomb": "not a PNG, JPEG or WebP", "gif": "not a PNG, JPEG or WebP"}[case]
    assert expected in message, message
    assert not (tmp_path / "study").exists() and not list(tmp_path.glob(".tmp-study-*"))  # nothing half-made


def test_create_refusal_through_the_command_line(tmp_path, capsys):
    (tmp_path / "id_rsa").write_text(KEY)
    a = fake_generation(tmp_path / "a", ["p0"], (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["p0"], (0, 0, 200))
    row = json.loads((b / "manifest.jsonl").read_text())
    (b / "manifest.jsonl").write_text(json.dumps({**row, "path": "../id_rsa"}) + "\n")
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "manifest.jsonl, row 1: image '../id_rsa'" in err and "outside the generation folder" in err
    assert not (tmp_path / "s").exists()


def test_images_that_stay_inside_are_taken(tmp_path):
    a = fake_generation(tmp_path / "a", ["p0", "p1"], (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["p0", "p1"], (0, 0, 200))
    (b / "images" / "alias.png").symlink_to(b / "images" / "p00000-i00.png")  # a symlink inside the folder
    Image.new("RGB", (8, 8), (0, 0, 200)).save(b / "images" / "photo.jpg", format="JPEG")
    rows = [json.loads(line) for line in (b / "manifest.jsonl").read_text().splitlines()]
    rows[0]["path"], rows[1]["path"] = "images/alias.png", "images/../images/photo.jpg"
    (b / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = create_study(a, b, tmp_path / "study")
    for item in store.items():
        with Image.open(tmp_path / "study" / "images" / item["image_b"]) as image:
            assert image.format == "PNG"  # a JPEG is converted: the server serves image/png only


# -- the server ----------------------------------------------------------------------------------------
def _vote(client, token, assignment_id, **fields):
    return client.post("/api/vote", json={"token": token, "assignment_id": assignment_id, "client_id": "c1",
                                          **ANSWER, **fields})


def test_malformed_requests_get_4xx_not_500(tmp_path):
    store, token = _study(tmp_path)
    client = _client(tmp_path / "study")
    item = client.get("/api/next", params={"token": token}).json()
    aid = item["assignment_id"]
    name = _name(item["left"])
    body = '{{"token": {}, "assignment_id": {}, "client_id": {}, "q1": {}, "q2": "tie", "q3": "tie"}}'
    cases = {
        "100k-deep JSON": client.post("/api/vote", content=b"[" * 100_000 + b"]" * 100_000),
        "5k-deep JSON (under the size limit)": client.post("/api/vote", content=b"[" * 5000 + b"]" * 5000),
        "a 5000-digit number": client.post("/api/vote", content=body.format('"x"', "9" * 5000, '"c"', '"tie"')),
        "token as a list": _vote(client, [token], aid),
        "token as an object": _vote(client, {"token": token}, aid),
        "token as a number": _vote(client, 12345, aid),
        "assignment id 2^63": _vote(client, token, 2**63),
        "assignment id 10^30": _vote(client, token, 10**30),
        "assignment id -1": _vote(client, token, -1),
        "client_id as an object": _vote(client, token, aid, client_id={"a": 1}),
        "answer as a list": _vote(client, token, aid, q1=["left"]),
        "lone surrogate token": client.post("/api/vote", content=body.format('"\\ud800"', aid, '"c"', '"tie"')),
        "lone surrogate client_id": client.post("/api/vote", content=body.format(f'"{token}"', aid, '"\\udfff"', '"tie"')),
        "lone surrogate answer": client.post("/api/vote", content=body.format(f'"{token}"', aid, '"c"', '"\\ud800"')),
        "body not UTF-8": client.post("/api/vote", content=b'{"token": "\xff\xfe"}'),
        "undo: token as a list": client.post("/api/undo", json={"token": [token]}),
        "undo: body a list": client.post("/api/undo", json=[token]),
        "undo: lone surrogate token": client.post("/api/undo", content=b'{"token": "\\ud800"}'),
        "undo: nothing to undo": client.post("/api/undo", json={"token": token}),
        "non-ASCII admin token": client.get("/admin/results", params={"admin_token": "schlüssel"}),
        "admin token with NUL": client.get("/admin/invites", params={"admin_token": "a\x00b"}),
        "non-ASCII token": client.get("/api/next", params={"token": "schlüssel"}),
        "token with NUL": client.get("/", params={"token": "a\x00b"}),
        "NUL in an image name": client.get("/img/%00.png", params={"token": token}),
        "NUL after an image name": client.get(f"/img/{name}%00", params={"token": token}),
        "NUL in the old image route": client.get("/images/%00.png"),
    }
    bad = {what: (r.status_code, r.text[:100]) for what, r in cases.items() if not 400 <= r.status_code < 500}
    assert bad == {}
    for what, response in cases.items():
        if response.headers["content-type"] == "application/json":
            assert response.json()["error"], what
    assert len(open_study(tmp_path / "study").votes()) == 0


def test_a_big_body_gets_413_before_it_is_read(tmp_path):
    _study(tmp_path)
    client = _client(tmp_path / "study")
    assert client.post("/api/vote", content=b" " * (MAX_BODY + 1)).status_code == 413
    with running_server(tmp_path / "study") as url:
        port = int(url.rsplit(":", 1)[1])
        # a declared 256 MiB body: refused from the header, after 1 KiB of it was sent
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/vote HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 268435456\r\n\r\n" + b" " * 1024)
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
        for length, status in ((b"9" * 5000, b"413"), (b"12abc", b"400")):  # odd lengths: a 4xx, not a 500
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"POST /api/vote HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
                assert s.recv(4096)[9:12] in (status, b"400"), length[:10]  # (the HTTP parser may refuse first)
        # a chunked body with no length: refused once the stream passes the limit
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/vote HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(3 * MAX_BODY // 4096):
                try:
                    s.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")
                except (ConnectionResetError, BrokenPipeError):
                    break  # the server answered and closed while the rest was on its way: what it sent is read below
            assert s.recv(4096).startswith(b"HTTP/1.1 413")


def test_security_headers_on_every_response(tmp_path, monkeypatch):
    store, token = _study(tmp_path)
    client = _client(tmp_path / "study")
    item = client.get("/api/next", params={"token": token}).json()
    pages = [client.get("/", params={"token": token}) for _ in range(2)]
    responses = pages + [client.get(item["left"]), client.get("/api/next", params={"token": token}),
                         client.get("/?token=forged"), client.get("/nothere"), client.get("/admin/results"),
                         client.post("/api/vote", content=b" " * (MAX_BODY + 1)), client.post("/api/vote", content=b"x")]
    monkeypatch.setattr(StudyStore, "progress", lambda *a: 1 / 0)  # a bug: the 500 gets the headers too
    responses.append(client.get("/api/next", params={"token": token}))
    assert responses[-1].status_code == 500
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY", r.url
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, r.url
    nonces = []
    for page in pages:
        csp = page.headers["content-security-policy"]
        nonce = re.search(r"script-src 'nonce-([A-Za-z0-9_-]{16,})'", csp).group(1)
        assert f"style-src 'nonce-{nonce}'" in csp
        tags = re.findall(r"<(script|style)([^>]*)>", page.text)
        assert len(tags) == 2 and all(f'nonce="{nonce}"' in attrs for _, attrs in tags)
        assert not re.search(r"\son\w+=|style=|javascript:", page.text)  # no inline handlers or styles
        nonces.append(nonce)
    assert nonces[0] != nonces[1]  # a fresh nonce per response


def test_tokens_stay_out_of_the_access_log(tmp_path):
    store, token = _study(tmp_path)
    admin = store.meta("admin_token")
    proc = subprocess.Popen([sys.executable, "-m", "ncppo.cli", "study", "serve", str(tmp_path / "study"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = []
        while not (url := re.search(r"running on (http://\S+)", "".join(lines))):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = url.group(1)
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/", params={"token": token}).status_code == 200
            item = http.get("/api/next", params={"token": token}).json()
            assert http.get(item["left"]).status_code == 200
            assert http.get("/admin/invites", params={"admin_token": admin}).status_code == 200
            assert http.get(f"/api/next?x=1&token={token}").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        # read through the same buffered reader as readline (communicate(timeout=...) reads the pipe itself and
        # would miss what the reader already buffered: here the banner, printed right after "running on")
        out = "".join(lines) + proc.stdout.read()
        proc.wait(timeout=20)
    # the banner gives the organiser the admin links (on the console, like `study create`); the log never
    banner = [line for line in out.splitlines() if "admin_token=" in line and "[redacted]" not in line]
    assert [line.split(": ")[0].strip() for line in banner] == ["results (admin)", "invite links (admin)"], out
    logged = "\n".join(line for line in out.splitlines() if line not in banner)
    assert token not in out and admin not in logged, out
    assert re.search(r"study study \(.*\): 2 items x 2 votes, 0 complete; 1 annotator\(s\) invited", out)
    assert f"{url}/admin/results?admin_token={admin}" in out  # the port actually bound (--port 0)
    assert '"GET /api/next?token=[redacted] HTTP/1.1" 200' in out and "/admin/invites?admin_token=[redacted]" in out
    assert f'"GET /img/{_name(item["left"])}?token=[redacted]' in out and "?x=[redacted]&token=[redacted]" in out


# -- a kill inside `study create` -----------------------------------------------------------------------
CREATE = """
import sys
from ncppo.study.create import create_study
create_study(sys.argv[1], sys.argv[2], sys.argv[3], votes_per_item=1, **({"overwrite": True} if sys.argv[4] == "1" else {}))
"""


def _many_rows(folder, n, colour):
    """A generation output of ``n`` rows that share one image file (cheap to make, slow enough to copy)."""
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), colour).save(folder / "images" / "one.png")
    rows = [{"id": f"p{p:05d}-i00", "prompt": f"prompt {p}", "prompt_index": p, "image_index": 0, "seed": p,
             "path": "images/one.png"} for p in range(n)]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _kill_mid_create(tmp_path, out, overwrite):
    a, b = _many_rows(tmp_path / "big-a", 4000, (200, 0, 0)), _many_rows(tmp_path / "big-b", 4000, (0, 0, 200))
    proc = subprocess.Popen([sys.executable, "-c", CREATE, str(a), str(b), str(out), "1" if overwrite else "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        scratch = next(out.parent.glob(f".tmp-{out.name}-*"), None)
        busy = [f / "images" for f in (scratch, out) if f is not None and (f / "images").is_dir()]
        if any(len(os.listdir(images)) >= 50 for images in busy):  # half-way (an old study has 4 images)
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read()  # killed half-way, not finished
    return scratch


def test_a_kill_inside_create_leaves_no_study(tmp_path):
    out = tmp_path / "study"
    scratch = _kill_mid_create(tmp_path, out, overwrite=False)
    assert not out.exists()  # no half-made study where the study goes
    with pytest.raises(FileNotFoundError, match="not a study"):
        open_study(out)
    for refuse in (open_study, create_app):  # the scratch folder left behind is refused with a clear message
        with pytest.raises(IncompleteStudyError, match="scratch folder of an interrupted `ncppo study create`"):
            refuse(scratch)
    _study(tmp_path, name="study")  # the next create into the same folder works


def test_a_kill_inside_create_overwrite_keeps_the_old_study(tmp_path):
    store, token = _study(tmp_path)
    a = store.next_assignment(token)
    store.submit(token, a.id, "kept", ANSWER)
    before = store.items()
    store.close()
    _kill_mid_create(tmp_path, tmp_path / "study", overwrite=True)
    old = open_study(tmp_path / "study", check_images=True)
    assert old.items() == before and [v["client_id"] for v in old.votes()] == ["kept"]
    assert _client(tmp_path / "study").get("/api/next", params={"token": token}).status_code == 200


def test_create_refuses_to_replace_a_study_without_overwrite(tmp_path, capsys):
    store, token = _study(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "study")]) == 2
    assert "already holds a study" in capsys.readouterr().err and len(open_study(tmp_path / "study").items()) == 2
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(a / "inside")]) == 2
    assert "inside the input" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("months of work")
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "months of work"
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "study"), "--overwrite"]) == 0
    assert open_study(tmp_path / "study").votes() == [] and not list(tmp_path.glob(".[to][ml][pd]-*"))


@pytest.mark.parametrize("damage", ["no marker", "no database", "an image missing"])
def test_the_server_refuses_a_half_made_study(tmp_path, capsys, damage):
    _study(tmp_path)
    folder = tmp_path / "study"
    if damage == "no marker":  # what an interrupted create of an older ncppo left
        (folder / ".ncppo-output.json").unlink()
    if damage == "no database":
        for p in folder.glob("study.sqlite*"):
            p.unlink()
    if damage == "an image missing":
        next((folder / "images").iterdir()).unlink()
    expected = {"no marker": "not a complete study", "no database": "half-made study",
                "an image missing": "image(s) of its items are missing"}[damage]
    with pytest.raises(IncompleteStudyError, match=re.escape(expected)):
        create_app(folder)
    assert main(["study", "serve", str(folder), "--port", "0"]) == 2  # refused before the port is bound
    assert expected in capsys.readouterr().err


# -- gold files: each fault named by file, line and field ---------------------------------------------------
@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "gold.jsonl line 2: not valid JSON"),
    ('["a"]', "gold.jsonl line 2: a JSON object"),
    ('{"prompt": "p", "better": "img/good0.png"}', "gold.jsonl line 2: field 'worse' must be a non-empty string"),
    ('{"prompt": "p", "better": "img/good0.png", "worse": "img/bad0.png", "questions": ["q9"]}',
     "gold.jsonl line 2: field 'questions' must be a list of q1, q2, q3"),
    ('{"prompt": "p", "better": "../a/images/p00000-i00.png", "worse": "img/bad0.png"}',
     "gold.jsonl line 2: field 'better' ('../a/images/p00000-i00.png') leads to"),
    ('{"prompt": "p", "better": "img/none.png", "worse": "img/bad0.png"}',
     "gold.jsonl line 2: field 'better' ('img/none.png') does not exist"),
])
def test_a_bad_gold_file_is_named_by_line_and_field(tmp_path, capsys, line, message):
    from tests.study_helpers import fake_gold

    a = fake_generation(tmp_path / "a", ["p"], (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["p"], (0, 0, 200))
    gold = fake_gold(tmp_path / "g", 1)
    gold.write_text(gold.read_text() + line + "\n")
    args = ["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s"), "--gold", str(gold)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "s").exists()


# -- `study results --out`: the output-folder rule of every command that writes a folder ---------------------
def test_results_never_overwrite_a_foreign_folder_or_the_study(tmp_path, capsys):
    store, token = _study(tmp_path)
    a = store.next_assignment(token)
    store.submit(token, a.id, "c1", ANSWER)
    store.close()
    study = tmp_path / "study"
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "results.json").write_text("my own results")
    assert main(["study", "results", str(study), "--out", str(paper)]) == 2
    assert "no ncppo command wrote" in capsys.readouterr().err
    assert sorted(p.name for p in paper.iterdir()) == ["results.json"] and (paper / "results.json").read_text() == "my own results"
    before = sorted(p.name for p in study.iterdir())
    assert main(["study", "results", str(study), "--out", str(study)]) == 2  # would replace the study itself
    assert "contains the input" in capsys.readouterr().err and sorted(p.name for p in study.iterdir()) == before
    assert len(open_study(study).votes()) == 1
    for _ in range(2):  # its own output (the default STUDY/results) is replaced, whole
        assert main(["study", "results", str(study)]) == 0
    assert sorted(p.name for p in (study / "results").iterdir()) == [".ncppo-output.json", "results.json", "results.png",
                                                                      "votes.csv", "votes.parquet"]
    (study / "results" / ".ncppo-output.json").unlink()  # written before outputs were marked: still its own
    assert main(["study", "results", str(study)]) == 0
    assert main(["study", "results", str(study), "--out", str(paper), "--overwrite"]) == 0
    assert json.loads((paper / "results.json").read_text())["votes"] == 1
    assert not list(tmp_path.glob(".[tno][mel][pdw]-*")) and not list(study.glob(".[tno][mel][pdw]-*"))
