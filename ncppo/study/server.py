"""``ncppo study serve``: the annotation web app (Starlette; plain HTML and JavaScript, no build step).

Routes: ``GET /?token=T`` the page; ``GET /api/next?token=T`` the next item (or ``{"done": true}``);
``POST /api/vote`` a vote ``{token, assignment_id, client_id, q1, q2, q3}`` (answers left | right | tie);
``GET /images/NAME`` a study image; ``GET /admin/results?admin_token=A`` and ``/admin/invites`` for the
organiser. Tokens: 401 when missing, 403 when wrong. Every bad request is a 4xx with a message.
Prompts only ever reach the page as JSON and are set with ``textContent``; images are served only from
the study's own ``images/`` folder, by exact file name.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ncppo.study.create import open_study
from ncppo.study.store import QUESTION_TEXT, StudyError

IMAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\.png$")
PAGE = (Path(__file__).parent / "page.html").read_text()


def create_app(study_dir: str | Path) -> Starlette:
    study_dir = Path(study_dir)
    images = (study_dir / "images").resolve()
    local = threading.local()  # one SQLite connection per server thread

    def store():
        if not hasattr(local, "store"):
            local.store = open_study(study_dir)
        return local.store

    def error(err: StudyError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    async def page(request: Request) -> Response:
        try:
            name = store().annotator(request.query_params.get("token"))
        except StudyError as err:
            return HTMLResponse(f"<!doctype html><p>{html.escape(str(err))}</p>", status_code=err.status)
        questions = json.dumps(QUESTION_TEXT).replace("<", "\\u003c")  # safe inside <script>
        return HTMLResponse(PAGE.replace("__ANNOTATOR__", html.escape(name)).replace("__QUESTIONS__", questions))

    async def next_item(request: Request) -> Response:
        token = request.query_params.get("token")
        try:
            assignment = store().next_assignment(token)
            progress = store().progress(token)
        except StudyError as err:
            return error(err)
        if assignment is None:
            return JSONResponse({"done": True, "progress": progress})
        return JSONResponse({"done": False, "assignment_id": assignment.id, "prompt": assignment.prompt,
                             "left": f"/images/{assignment.left_image}", "right": f"/images/{assignment.right_image}",
                             "progress": progress})

    async def vote(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        assignment_id = body.get("assignment_id")
        if not isinstance(assignment_id, int) or isinstance(assignment_id, bool):
            return JSONResponse({"error": "assignment_id must be an integer"}, status_code=400)
        try:
            recorded = store().submit(body.get("token"), assignment_id, str(body.get("client_id") or ""),
                                      {q: body.get(q) for q in ("q1", "q2", "q3")})
        except StudyError as err:
            return error(err)
        return JSONResponse({"ok": True, "duplicate": not recorded})

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        path = (images / name).resolve()
        if not IMAGE_NAME.match(name) or path.parent != images or not path.is_file():
            return JSONResponse({"error": "no such image"}, status_code=404)
        return FileResponse(path, media_type="image/png")

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

    return Starlette(routes=[
        Route("/", page), Route("/api/next", next_item), Route("/api/vote", vote, methods=["POST"]),
        Route("/images/{name:path}", image), Route("/admin/results", admin_results),
        Route("/admin/invites", admin_invites),
    ])


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    open_study(study_dir)  # fail before binding the port when the folder is not a study
    uvicorn.run(create_app(study_dir), host=host, port=port, log_level="info")


@contextlib.contextmanager
def running_server(study_dir: str | Path, host: str = "127.0.0.1", port: int = 0):
    """Serve the study in a background thread (tests, load tests, screenshots); yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(study_dir), host=host, port=port, log_level="warning"))
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
