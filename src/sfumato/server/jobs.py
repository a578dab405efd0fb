"""The persistent job queue: one SQLite file (WAL) in the outputs folder.

A job goes queued -> running -> done | failed | cancelled | interrupted. A server killed while a
job runs finds it `running` at start-up and puts it back in the queue (`requeue_running`); its
image file names are fixed per (job, index), so a re-run overwrites instead of duplicating.
Monthly image quotas are counted here too, so that a restart does not reset them.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

FINAL = ("done", "failed", "cancelled", "interrupted")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    init_image BLOB,
    owner TEXT,
    month TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    user_error INTEGER NOT NULL DEFAULT 0,
    images TEXT NOT NULL DEFAULT '[]',
    info TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT NOT NULL, month TEXT NOT NULL, images INTEGER NOT NULL,
    PRIMARY KEY (owner, month)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Job:
    id: str
    kind: str  # "txt2img" | "img2img"
    status: str
    params: dict  # GenerationParams fields (seed resolved) + n_iter, model, vae
    owner: str | None
    month: str
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    error: str | None = None
    user_error: bool = False
    # one entry per finished image: {"index", "path" (relative to outputs), "seed", "infotext"}
    images: list[dict] = field(default_factory=list)
    info: dict | None = None
    init_image: bytes | None = None

    @property
    def image_count(self) -> int:
        return int(self.params.get("batch_size", 1)) * int(self.params.get("n_iter", 1))

    def public(self) -> dict:
        """The job as the HTTP API shows it (no blobs, no owner)."""
        return {
            "id": self.id, "kind": self.kind, "status": self.status, "params": self.params,
            "created": self.created, "started": self.started, "finished": self.finished,
            "attempts": self.attempts, "error": self.error,
            "images": [{**image, "url": f"/api/jobs/{self.id}/images/{image['index']}"}
                       for image in self.images],
        }


def current_month(now: float | None = None) -> str:
    return datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y-%m")


def next_month_start(now: float | None = None) -> datetime:
    """When a monthly quota resets: the first instant of next month, UTC."""
    today = datetime.fromtimestamp(now or time.time(), UTC)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


class QuotaExceeded(Exception):
    def __init__(self, used: int, quota: int):
        super().__init__(f"monthly image quota used: {used} of {quota}")
        self.used, self.quota = used, quota


class JobStore:
    """Thread-safe access to the jobs database; every method is one short transaction."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a finished job survives a power cut
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple = ()) -> int:
        with self.lock:
            return self.db.execute(sql, args).rowcount

    def submit(self, kind: str, params: dict, *, owner: str | None = None,
               init_image: bytes | None = None, quota: int | None = None) -> Job:
        """Insert a queued job; with a quota, reserve its images in the same transaction."""
        now = time.time()
        job = Job(id=secrets.token_hex(8), kind=kind, status="queued", params=params,
                  owner=owner, month=current_month(now), created=now, init_image=init_image)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if quota is not None:
                    used = self._used(owner, job.month)
                    if used + job.image_count > quota:
                        raise QuotaExceeded(used, quota)
                if owner is not None:
                    self._add_usage(owner, job.month, job.image_count)
                self.db.execute(
                    "INSERT INTO jobs (id, kind, status, params, init_image, owner, month, created)"
                    " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                    (job.id, kind, json.dumps(params), init_image, owner, job.month, now))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return job

    def _used(self, owner: str | None, month: str) -> int:
        row = self.db.execute("SELECT images FROM usage WHERE owner IS ? AND month = ?",
                              (owner, month)).fetchone()
        return row["images"] if row else 0

    def _add_usage(self, owner: str, month: str, images: int) -> None:
        self.db.execute(
            "INSERT INTO usage (owner, month, images) VALUES (?, ?, ?) ON CONFLICT (owner, month)"
            " DO UPDATE SET images = max(0, images + excluded.images)", (owner, month, images))

    def usage(self, owner: str, month: str | None = None) -> int:
        with self.lock:
            return self._used(owner, month or current_month())

    def get(self, job_id: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, *, owner: str | None = None, status: str | None = None, limit: int = 50,
             before: float | None = None, any_owner: bool = True) -> list[Job]:
        """Newest first. `any_owner=False` restricts to jobs of `owner`."""
        where, args = ["created < ?"], [before if before is not None else float("inf")]
        if status:
            where.append("status = ?")
            args.append(status)
        if not any_owner:
            where.append("owner IS ?")
            args.append(owner)
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        return [_job(row) for row in self._query(sql, (*args, limit))]

    def queue_position(self, job_id: str) -> int | None:
        """0 = running or next; None once final."""
        rows = self._query(
            "SELECT (SELECT count(*) FROM jobs q WHERE q.status IN ('queued', 'running')"
            " AND q.seq < j.seq) AS ahead, j.status FROM jobs j WHERE j.id = ?", (job_id,))
        return None if not rows or rows[0]["status"] in FINAL else rows[0]["ahead"]

    def pending_count(self) -> int:
        return self._query("SELECT count(*) AS n FROM jobs WHERE status IN ('queued', 'running')")[0]["n"]

    def claim_next(self) -> Job | None:
        """The oldest queued job, marked running (only the one worker thread calls this)."""
        with self.lock:
            row = self.db.execute(
                "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1"
                " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1)"
                " RETURNING *", (time.time(),)).fetchone()
        return _job(row) if row else None

    def requeue_running(self) -> int:
        """At start-up: jobs left `running` by a dead server go back to the queue, in order."""
        return self._execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")

    def record_images(self, job_id: str, images: list[dict]) -> None:
        """After each batch: the images written so far (a resumed job skips those)."""
        self._execute("UPDATE jobs SET images = ? WHERE id = ?", (json.dumps(images), job_id))

    def finish(self, job_id: str, status: str, *, error: str | None = None,
               user_error: bool = False, info: dict | None = None,
               only_if: tuple[str, ...] = ("queued", "running")) -> bool:
        """Make a job final if its status is in `only_if`; images it will not make are given
        back to its owner's quota. False if the job was not in one of those states."""
        assert status in FINAL
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                rows = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchall()
                if not rows or rows[0]["status"] not in only_if:
                    return False
                job = _job(rows[0])
                if job.owner is not None:
                    self._add_usage(job.owner, job.month, len(job.images) - job.image_count)
                self.db.execute(
                    "UPDATE jobs SET status = ?, finished = ?, error = ?, user_error = ?, info = ?,"
                    " init_image = NULL WHERE id = ?",
                    (status, time.time(), error, int(user_error),
                     json.dumps(info) if info else None, job_id))
                return True
            finally:
                self.db.execute("COMMIT")

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is running or final."""
        return self.finish(job_id, "cancelled", only_if=("queued",))

    def setting(self, key: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    def set_setting(self, key: str, value: str) -> None:
        self._execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key)"
                          " DO UPDATE SET value = excluded.value", (key, value))


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], kind=row["kind"], status=row["status"], params=json.loads(row["params"]),
        owner=row["owner"], month=row["month"], created=row["created"], started=row["started"],
        finished=row["finished"], attempts=row["attempts"], error=row["error"],
        user_error=bool(row["user_error"]), images=json.loads(row["images"]),
        info=json.loads(row["info"]) if row["info"] else None, init_image=row["init_image"])
