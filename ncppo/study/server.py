"""``ncppo study serve``: the annotation web app (Starlette; plain HTML and JavaScript, no build step).

Routes: ``GET /?token=T`` the page; ``GET /api/next?token=T`` the next item (or ``{"done": true, "waiting": w}``,
``w`` when items are still held by other annotators and more may come); ``POST /api/vote`` a vote
``{token, assignment_id, client_id, q1, q2, q3}`` (answers left | right | tie); ``POST /api/undo`` ``{token}``
takes back the annotator's last vote and answers with its item and the answers it had;
``GET /img/NAME.png?token=T`` an image of one of the annotator's own items; ``GET /admin/results?admin_token=A``
and ``/admin/invites`` for the organiser. Tokens: 401 when missing, 403 when wrong.

- Blind: image names are random (``ncppo study create``), so neither a name nor the order says which model
  made an image; an image goes only to an annotator who was assigned its item, without file dates.
- Every bad request is a 4xx with a message: bodies over ``MAX_BODY`` bytes get 413 before they are read
  (Content-Length) or as soon as the stream passes the limit; JSON too deep or too big, tokens of the
  wrong type, ids beyond SQLite's integers, odd characters: 400, 403 or 404.
- Every response carries a Content-Security-Policy (scripts and styles only with the page's per-response
  nonce, nothing from other origins, no framing), ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY`` and ``Cache-Control: no-store``.
- The access log shows no tokens: query values are written as ``[redacted]``.
- Prompts only ever reach the page as JSON and are set with ``textContent``.
"""

from __future__ import annotations

import contextlib
import copy
import html
import json
import logging
import re
import secrets
import threading
import time
import urllib.parse
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ncppo.study.create import open_study
from ncppo.study.store import QUESTION_TEXT, StudyError

MAX_BODY = 16 * 1024  # a vote is ~200 bytes
PAGE = (Path(__file__).parent / "page.html").read_text()
CSP = ("default-src 'self'; script-src {src}; style-src {src}; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP.format(src="'self'"), "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "x-frame-options": "DENY", "cache-control": "no-store"}


def _error(message: str, status: int) -> JSONResponse:
    # backslashreplace: a message quoting odd input (a lone surrogate) must still encode as UTF-8
    return JSONResponse({"error": message.encode("utf-8", "backslashreplace").decode("utf-8")}, status_code=status)


class Guard:
    """ASGI middleware: security headers on every response; 413 for a declared body over ``MAX_BODY``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in HEADERS.items():
                    if key not in headers:  # the page sets its own policy (with its nonce)
                        headers[key] = value
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await _error("Content-Length must be a number of bytes", 400)(scope, receive, send_with_headers)
        if len(length) > 12 or int(length) > MAX_BODY:  # (int() of thousands of digits would raise)
            response = _error(f"the request body must be at most {MAX_BODY} bytes", 413)
            response.headers["connection"] = "close"
            return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


async def _read_json(request: Request) -> dict:
    """The body as a JSON object, read up to ``MAX_BODY`` bytes (413 past it; chunked bodies too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise StudyError(f"the request body must be at most {MAX_BODY} bytes", 413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, a number with too many digits
        raise StudyError("the body must be JSON", 400) from None
    if not isinstance(body, dict):
        raise StudyError("the body must be a JSON object", 400)
    return body


RETRY_AFTER_S = 20  # how often a page with nothing to judge right now asks again


def _item(assignment, token: str, progress: dict) -> dict:
    query = urllib.parse.urlencode({"token": token})
    return {"done": False, "assignment_id": assignment.id, "prompt": assignment.prompt,
            "left": f"/img/{assignment.left_image}?{query}", "right": f"/img/{assignment.right_image}?{query}",
            "progress": progress}


def banner(study_dir: str | Path, base_url: str) -> str:
    """What ``study serve`` prints: the study, its items, its annotators and the organiser's links."""
    study_dir = Path(study_dir)
    store = open_study(study_dir)
    try:
        gold = len(store.gold())
        items = len(store.items()) - gold
        annotators = store.conn.execute("SELECT COUNT(*) FROM annotators").fetchone()[0]
        admin = urllib.parse.urlencode({"admin_token": store.meta("admin_token")})
        progress = store.progress("")
        lines = [f"study {study_dir.resolve().name} ({study_dir}): {items} items x {store.votes_per_item} votes"
                 + (f" + {gold} gold items" if gold else "") + f", {progress['items_complete']} complete; "
                 f"{annotators} annotator(s) invited (`ncppo study invite {study_dir}` adds more)",
                 f"  annotation page: {base_url}/?token=<an invite token>",
                 f"  results (admin): {base_url}/admin/results?{admin}",
                 f"  invite links (admin): {base_url}/admin/invites?{admin}"]
    finally:
        store.close()
    return "\n".join(lines)


def create_app(study_dir: str | Path) -> Guard:
    study_dir = Path(study_dir)
    open_study(study_dir, check_images=True).close()  # refuse a half-made or damaged study before serving it
    images = study_dir / "images"
    local = threading.local()  # one SQLite connection per server thread

    def store():
        if not hasattr(local, "store"):
            local.store = open_study(study_dir)
        return local.store

    def error(err: StudyError) -> JSONResponse:
        response = _error(str(err), err.status)
        if err.status == 413:  # the rest of the body is not read: end the connection
            response.headers["connection"] = "close"
        return response

    async def page(request: Request) -> Response:
        try:
            name = store().annotator(request.query_params.get("token"))
        except StudyError as err:
            return HTMLResponse(f"<!doctype html><p>{html.escape(str(err))}</p>", status_code=err.status)
        nonce = secrets.token_urlsafe(16)
        as_script = lambda value: json.dumps(value).replace("<", "\\u003c")  # noqa: E731 (safe inside <script>)
        body = PAGE.replace("__NONCE__", nonce).replace("__QUESTIONS__", as_script(QUESTION_TEXT))
        body = body.replace("__INSTRUCTIONS__", as_script(store().instructions))
        return HTMLResponse(body.replace("__ANNOTATOR__", html.escape(name)),
                            headers={"content-security-policy": CSP.format(src=f"'nonce-{nonce}'")})

    async def next_item(request: Request) -> Response:
        token = request.query_params.get("token")
        try:
            assignment = store().next_assignment(token)
            progress = store().progress(token)
        except StudyError as err:
            return error(err)
        if assignment is None:
            return JSONResponse({"done": True, "waiting": store().waiting(token), "retry_after_s": RETRY_AFTER_S,
                                 "progress": progress})
        return JSONResponse(_item(assignment, token, progress))

    async def undo(request: Request) -> Response:
        try:
            body = await _read_json(request)
            assignment, answers = store().undo(body.get("token"))
            progress = store().progress(body.get("token"))
        except StudyError as err:
            return error(err)
        return JSONResponse({**_item(assignment, body["token"], progress), "answers": answers})

    async def vote(request: Request) -> Response:
        try:
            body = await _read_json(request)
            recorded = store().submit(body.get("token"), body.get("assignment_id"), body.get("client_id"),
                                      {q: body.get(q) for q in ("q1", "q2", "q3")})
        except StudyError as err:
            return error(err)
        return JSONResponse({"ok": True, "duplicate": not recorded})

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            store().image_allowed(request.query_params.get("token"), name)
            data = (images / name).read_bytes()  # a name of the database, matched as [A-Za-z0-9_-]+.png
        except StudyError as err:
            return error(err)
        except OSError:
            return _error("no such image", 404)
        return Response(data, media_type="image/png")  # no Last-Modified: copy times could tell A from B

    async def admin_results(request: Request) -> Response:
        from ncppo.study.results import study_results

        try:
            store().check_admin(request.query_params.get("admin_token"))
        except StudyError as err:
            return error(err)
        return JSONResponse(study_results(store()))

    async def admin_invites(request: Request) -> Response:
        try:
            store().check_admin(request.query_params.get("admin_token"))
        except StudyError as err:
            return error(err)
        rows = store().conn.execute("SELECT name, token FROM annotators ORDER BY created_at, name").fetchall()
        return JSONResponse([{"name": r["name"], "link": f"/?token={r['token']}"} for r in rows])

    return Guard(Starlette(routes=[
        Route("/", page), Route("/api/next", next_item), Route("/api/vote", vote, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/img/{name:path}", image), Route("/admin/results", admin_results),
        Route("/admin/invites", admin_invites),
    ]))  # outside Starlette's error middleware: its 500s get the headers too


QUERY_VALUE = re.compile(r"=[^&]*")


def redact(path: str) -> str:
    """``path`` with every query value replaced: tokens travel in queries and must not reach a log."""
    base, sep, query = path.partition("?")
    return f"{base}?{QUERY_VALUE.sub('=[redacted]', query)}" if sep else path


class RedactTokens(logging.Filter):
    """A filter for uvicorn's access logger: its records carry the path with the query as ``args[2]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], redact(record.args[2]), *record.args[3:])
        return True


def log_config() -> dict:
    """uvicorn's logging set-up with ``RedactTokens`` on the access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_tokens"]
    return config


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):  # the banner once the port is bound (--port 0 picks one)
            await super().startup(sockets)
            if self.servers:
                bound = self.servers[0].sockets[0].getsockname()[1]
                print(banner(study_dir, f"http://{host}:{bound}"), flush=True)

    app = create_app(study_dir)  # fails before binding the port when the folder is not a complete study
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C ends it (as uvicorn.run does)
        Server(uvicorn.Config(app, host=host, port=port, log_level="info", log_config=log_config())).run()


@contextlib.contextmanager
def running_server(study_dir: str | Path, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve the study in a background thread (tests, load tests, screenshots); yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(study_dir), host=host, port=port, log_level=log_level,
                                           log_config=log_config()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the study server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
