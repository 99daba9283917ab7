"""A study's SQLite store (WAL): items, annotators, assignments and votes.

Every rule that keeps the data sound lives in SQL constraints and short ``BEGIN IMMEDIATE``
transactions, so many server threads (or processes) can share one file:

- a vote is one row, unique per (item, annotator) — nobody judges an item twice — and unique per
  ``client_id``, so a retried submission returns the first vote instead of counting again;
- an item is handed out only while its votes plus open assignments are below ``votes_per_item``;
- an assignment not answered within ``timeout_s`` is released and its slot given to someone else;
- the left/right order is drawn per assignment and stored; votes are kept both as clicked (left/right)
  and as A/B;
- image names are random (the mapping to A and B lives only here) and an image is shown only to an
  annotator assigned its item (``image_allowed``);
- every value from a request is checked before it reaches SQLite: tokens are strings of the
  ``token_urlsafe`` alphabet, ids positive and below 2^63, client ids printable ASCII (a 4xx otherwise);
- an annotator can undo their last answer: the vote is moved to ``undone`` (kept for the record, and its
  client id can never count again), its assignment reopens and the item they were shown since goes back;
- gold items (``gold``: the organiser knows the better image, which is ``image_a``) go to every
  annotator, spread among the regular items, and never count towards A and B.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ncppo.errors import NcppoError, StateError

QUESTIONS = ("q1", "q2", "q3")
QUESTION_TEXT = {
    "q1": "Which image do you prefer given the prompt?",
    "q2": "Which image is more visually appealing?",  # shown without the prompt
    "q3": "Which image better fits the text description?",
}
ANSWERS = ("left", "right", "tie")
FORMAT = "2"  # 2: random image names (blind), served only to annotators; written with the items, in one transaction
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what secrets.token_urlsafe makes; anything else is unknown
IMAGE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.png")
CLIENT_ID = re.compile(r"[\x20-\x7e]{1,100}")  # printable ASCII
MAX_ID = 2**63 - 1  # SQLite's largest integer

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, seed INTEGER NOT NULL, image_a TEXT NOT NULL,
    image_b TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS annotators (
    token TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL REFERENCES annotators(token), left_is_a INTEGER NOT NULL,
    created_at REAL NOT NULL, status TEXT NOT NULL CHECK (status IN ('open', 'done', 'released')));
CREATE INDEX IF NOT EXISTS assignments_open ON assignments(status, item_id);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
    item_id INTEGER NOT NULL REFERENCES items(id), annotator TEXT NOT NULL REFERENCES annotators(token),
    client_id TEXT NOT NULL UNIQUE, left_is_a INTEGER NOT NULL,
    q1 TEXT NOT NULL, q2 TEXT NOT NULL, q3 TEXT NOT NULL,            -- as clicked: left | right | tie
    q1_ab TEXT NOT NULL, q2_ab TEXT NOT NULL, q3_ab TEXT NOT NULL,   -- as judged: A | B | tie
    created_at REAL NOT NULL, UNIQUE (item_id, annotator));
CREATE UNIQUE INDEX IF NOT EXISTS items_image_a ON items(image_a);
CREATE UNIQUE INDEX IF NOT EXISTS items_image_b ON items(image_b);
CREATE INDEX IF NOT EXISTS assignments_annotator ON assignments(annotator, item_id);
"""
# added with undo and gold items; created on open too, so studies made before them read as having none
EXTRA_SCHEMA = """
CREATE TABLE IF NOT EXISTS gold (item_id INTEGER PRIMARY KEY REFERENCES items(id), questions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS undone (
    id INTEGER PRIMARY KEY, client_id TEXT NOT NULL UNIQUE, vote TEXT NOT NULL, undone_at REAL NOT NULL);
"""
REGULAR = "NOT EXISTS (SELECT 1 FROM gold g WHERE g.item_id = i.id)"


class StudyError(NcppoError, ValueError):
    """A request the study refuses; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class IncompleteStudyError(StateError, FileNotFoundError):
    """A folder that is not a complete study (an interrupted ``ncppo study create``); the message says what to do."""


@dataclass(frozen=True)
class Assignment:
    id: int
    item_id: int
    prompt: str
    left_image: str
    right_image: str
    left_is_a: bool


def iso_date(seconds: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the millisecond: ``2026-12-01T22:30:00.123Z``."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed vote survives a process crash
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection):
    """``BEGIN IMMEDIATE``: one writer at a time, so check-then-insert sequences cannot interleave."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class StudyStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist (create the study with `ncppo study create`)")
        self.conn = connect(self.path)
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'undone'").fetchone() is None:
            self.conn.executescript(EXTRA_SCHEMA)

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, items: list[dict], votes_per_item: int = 3, timeout_s: float = 600.0,
               study_seed: int = 0, gold: list[dict] = (), instructions: str = "") -> StudyStore:
        """``gold`` items are items whose ``image_a`` is the better one for each of their ``questions``."""
        conn = connect(path)
        conn.executescript(SCHEMA + EXTRA_SCHEMA)
        with transaction(conn):
            for key, value in (("votes_per_item", votes_per_item), ("timeout_s", timeout_s), ("seed", study_seed),
                               ("admin_token", secrets.token_urlsafe(24)), ("format", FORMAT),
                               ("instructions", instructions)):
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))
            for k, item in enumerate([*items, *gold]):
                cur = conn.execute("INSERT INTO items (prompt, seed, image_a, image_b, metadata) VALUES (?, ?, ?, ?, ?)",
                                   (item["prompt"], item["seed"], item["image_a"], item["image_b"],
                                    json.dumps(item.get("metadata") or {})))
                if k >= len(items):
                    conn.execute("INSERT INTO gold VALUES (?, ?)",
                                 (cur.lastrowid, json.dumps(list(item.get("questions") or QUESTIONS))))
        conn.close()
        return cls(path)

    def close(self) -> None:
        self.conn.close()

    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise IncompleteStudyError(f"{self.path} has no {key!r} setting: not a complete study "
                                       "(create it again with `ncppo study create`)")
        return row["value"]

    @property
    def votes_per_item(self) -> int:
        return int(self.meta("votes_per_item"))

    @property
    def timeout_s(self) -> float:
        return float(self.meta("timeout_s"))

    @property
    def instructions(self) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'instructions'").fetchone()
        return row["value"] if row else ""

    def gold(self) -> dict[int, list[str]]:
        """Gold item id -> the questions it checks (``image_a`` is the right answer)."""
        return {r["item_id"]: json.loads(r["questions"]) for r in self.conn.execute("SELECT * FROM gold")}

    # -- annotators --------------------------------------------------------------------------------
    def invite(self, n: int, prefix: str = "annotator") -> list[str]:
        tokens = [secrets.token_urlsafe(16) for _ in range(n)]
        with transaction(self.conn):
            start = self.conn.execute("SELECT COUNT(*) FROM annotators").fetchone()[0]
            self.conn.executemany("INSERT INTO annotators VALUES (?, ?, ?)",
                                  [(t, f"{prefix}-{start + i + 1}", time.time()) for i, t in enumerate(tokens)])
        return tokens

    def annotator(self, token) -> str:
        """The annotator's name; 401 without a token, 400 for a token that is not a string, 403 for an unknown one."""
        if token is None or token == "":
            raise StudyError("an invite token is required (?token=...)", 401)
        if not isinstance(token, str):
            raise StudyError("the token must be a string", 400)
        if not TOKEN.fullmatch(token):
            raise StudyError("unknown invite token", 403)
        row = self.conn.execute("SELECT name FROM annotators WHERE token = ?", (token,)).fetchone()
        if row is None:
            raise StudyError("unknown invite token", 403)
        return row["name"]

    def check_admin(self, token) -> None:
        if token is None or token == "":
            raise StudyError("an admin token is required", 401)
        if not isinstance(token, str):
            raise StudyError("the admin token must be a string", 400)
        # bytes: compare_digest refuses non-ASCII str (a TypeError, which the server would answer with a 500)
        if not TOKEN.fullmatch(token) or not secrets.compare_digest(token.encode(), self.meta("admin_token").encode()):
            raise StudyError("wrong admin token", 403)

    def image_allowed(self, token, name: str) -> None:
        """Refuse (401/403) a missing or unknown token, and (404) any image but those of the annotator's own items."""
        self.annotator(token)
        if not IMAGE_NAME.fullmatch(name) or self.conn.execute(
                "SELECT 1 FROM items i WHERE (i.image_a = ?1 OR i.image_b = ?1) AND EXISTS "
                "(SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.annotator = ?2)", (name, token)).fetchone() is None:
            raise StudyError("no such image", 404)

    # -- assignment --------------------------------------------------------------------------------
    def _release_expired(self, now: float) -> None:
        self.conn.execute("UPDATE assignments SET status = 'released' WHERE status = 'open' AND created_at < ?",
                          (now - self.timeout_s,))

    def next_assignment(self, token: str, rng: random.Random | None = None) -> Assignment | None:
        """The annotator's open assignment, or a new one on an item they have not judged; None when done."""
        self.annotator(token)
        now = time.time()
        with transaction(self.conn):
            self._release_expired(now)
            row = self.conn.execute("SELECT id FROM assignments WHERE annotator = ? AND status = 'open'",
                                    (token,)).fetchone()
            if row is None:
                item = self._next_item(token)
                if item is None:
                    return None
                left_is_a = int((rng or random.SystemRandom()).random() < 0.5)
                cur = self.conn.execute("INSERT INTO assignments (item_id, annotator, left_is_a, created_at, status) "
                                        "VALUES (?, ?, ?, ?, 'open')", (item["id"], token, left_is_a, now))
                row = {"id": cur.lastrowid}
            return self._assignment(row["id"])

    def _next_item(self, token: str):
        # regular items closest to complete first, so finished items (and majority votes) accumulate early
        item = self.conn.execute(
            f"""SELECT i.id,
                      (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id)
                    + (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND a.status = 'open') AS taken
               FROM items i
               WHERE NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.annotator = ?)
               AND {REGULAR} AND taken < ? ORDER BY taken DESC, i.id LIMIT 1""", (token, self.votes_per_item)).fetchone()
        gold = self.conn.execute(
            """SELECT g.item_id AS id FROM gold g WHERE NOT EXISTS
               (SELECT 1 FROM votes v WHERE v.item_id = g.item_id AND v.annotator = ?) ORDER BY g.item_id LIMIT 1""",
            (token,)).fetchone()
        if gold is None or item is None:
            return item or gold
        # gold items spread evenly: one after every `spacing` regular items the annotator judged
        n_regular, n_gold = (self.conn.execute(q).fetchone()[0] for q in (
            f"SELECT COUNT(*) FROM items i WHERE {REGULAR}", "SELECT COUNT(*) FROM gold"))
        judged_regular, judged_gold = (self.conn.execute(
            f"SELECT COUNT(*) FROM votes v JOIN items i ON i.id = v.item_id WHERE v.annotator = ? AND {cond}",
            (token,)).fetchone()[0] for cond in (REGULAR, f"NOT {REGULAR}"))
        spacing = max(1, n_regular // (n_gold + 1))
        return gold if judged_regular >= (judged_gold + 1) * spacing else item

    def waiting(self, token: str) -> bool:
        """Whether items the annotator has not judged are held by others' open assignments (so more may come)."""
        return self.conn.execute(
            f"""SELECT 1 FROM items i WHERE {REGULAR}
               AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.annotator = ?1)
               AND (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) < ?2 LIMIT 1""",
            (token, self.votes_per_item)).fetchone() is not None

    def _assignment(self, assignment_id: int) -> Assignment:
        r = self.conn.execute("SELECT a.id, a.item_id, a.left_is_a, i.prompt, i.image_a, i.image_b FROM assignments a "
                              "JOIN items i ON i.id = a.item_id WHERE a.id = ?", (assignment_id,)).fetchone()
        a_first = bool(r["left_is_a"])
        return Assignment(r["id"], r["item_id"], r["prompt"], r["image_a"] if a_first else r["image_b"],
                          r["image_b"] if a_first else r["image_a"], a_first)

    # -- votes -------------------------------------------------------------------------------------
    def submit(self, token: str, assignment_id: int, client_id: str, answers: dict[str, str]) -> bool:
        """Record a vote; returns False when ``client_id`` was already recorded (a retry: nothing changes)."""
        self.annotator(token)
        if not isinstance(assignment_id, int) or isinstance(assignment_id, bool) or not 0 < assignment_id <= MAX_ID:
            raise StudyError("assignment_id must be a positive integer below 2^63")
        if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
            raise StudyError("client_id must be a string of 1 to 100 printable ASCII characters")
        for q in QUESTIONS:
            if answers.get(q) not in ANSWERS:
                raise StudyError(f"{q} must be one of {', '.join(ANSWERS)}, got {answers.get(q)!r}")
        with transaction(self.conn):
            if self.conn.execute("SELECT 1 FROM undone WHERE client_id = ?", (client_id,)).fetchone():
                raise StudyError("this answer was undone; answer the item again", 409)
            done = self.conn.execute("SELECT annotator, assignment_id FROM votes WHERE client_id = ?", (client_id,)).fetchone()
            if done is not None:
                if done["annotator"] != token or done["assignment_id"] != assignment_id:
                    raise StudyError("client_id was already used for another vote", 409)
                return False
            a = self.conn.execute("SELECT * FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
            if a is None or a["annotator"] != token:
                raise StudyError(f"assignment {assignment_id} is not yours", 404)
            if a["status"] == "done":
                raise StudyError(f"assignment {assignment_id} was already answered", 409)
            if a["status"] == "released" or a["created_at"] < time.time() - self.timeout_s:
                raise StudyError(f"assignment {assignment_id} expired; fetch the next item", 409)
            to_ab = {"tie": "tie", "left": "A" if a["left_is_a"] else "B", "right": "B" if a["left_is_a"] else "A"}
            self.conn.execute(
                "INSERT INTO votes (assignment_id, item_id, annotator, client_id, left_is_a, q1, q2, q3, q1_ab, q2_ab, "
                "q3_ab, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (assignment_id, a["item_id"], token, client_id, a["left_is_a"], *(answers[q] for q in QUESTIONS),
                 *(to_ab[answers[q]] for q in QUESTIONS), time.time()))
            self.conn.execute("UPDATE assignments SET status = 'done' WHERE id = ?", (assignment_id,))
        return True

    def undo(self, token: str) -> tuple[Assignment, dict[str, str]]:
        """Take back the annotator's last vote: its assignment reopens (same sides), the item handed out since
        goes back to the others; returns the assignment and the answers that were given. 409 with none."""
        self.annotator(token)
        now = time.time()
        with transaction(self.conn):
            vote = self.conn.execute("SELECT * FROM votes WHERE annotator = ? ORDER BY id DESC LIMIT 1",
                                     (token,)).fetchone()
            if vote is None:
                raise StudyError("there is no answer of yours to undo", 409)
            self.conn.execute("UPDATE assignments SET status = 'released' WHERE annotator = ? AND status = 'open'",
                              (token,))
            record = {k: v for k, v in dict(vote).items() if k != "annotator"}
            self.conn.execute("INSERT INTO undone (client_id, vote, undone_at) VALUES (?, ?, ?)",
                              (vote["client_id"], json.dumps(record), now))
            self.conn.execute("DELETE FROM votes WHERE id = ?", (vote["id"],))
            self.conn.execute("UPDATE assignments SET status = 'open', created_at = ? WHERE id = ?",
                              (now, vote["assignment_id"]))
        return self._assignment(vote["assignment_id"]), {q: vote[q] for q in QUESTIONS}

    # -- progress and export -----------------------------------------------------------------------
    def progress(self, token: str) -> dict:
        done = self.conn.execute("SELECT COUNT(*) FROM votes WHERE annotator = ?", (token,)).fetchone()[0]
        total = self.conn.execute(f"SELECT COUNT(*) FROM items i WHERE {REGULAR}").fetchone()[0]
        complete = self.conn.execute(
            f"SELECT COUNT(*) FROM (SELECT v.item_id FROM votes v JOIN items i ON i.id = v.item_id WHERE {REGULAR} "
            "GROUP BY v.item_id HAVING COUNT(*) >= ?)", (self.votes_per_item,)).fetchone()[0]
        return {"judged_by_you": done, "items": total, "items_complete": complete}

    def votes(self) -> list[dict]:
        """Every vote, with the annotator's name (never the token), its item, ``gold`` (1 for a gold item) and
        ``created_at`` as an ISO 8601 date (UTC)."""
        rows = self.conn.execute(
            "SELECT v.*, an.name AS annotator_name, i.prompt, i.seed, i.metadata, "
            "EXISTS (SELECT 1 FROM gold g WHERE g.item_id = v.item_id) AS gold FROM votes v "
            "JOIN items i ON i.id = v.item_id JOIN annotators an ON an.token = v.annotator ORDER BY v.id").fetchall()
        out = []
        for r in rows:
            vote = {k: v for k, v in dict(r).items() if k != "annotator"}  # tokens stay secret
            vote["created_at"] = iso_date(vote["created_at"])
            out.append(vote)
        return out

    def undone(self) -> list[dict]:
        return [{**json.loads(r["vote"]), "undone_at": iso_date(r["undone_at"])}
                for r in self.conn.execute("SELECT * FROM undone ORDER BY id")]

    def items(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM items ORDER BY id").fetchall()]
