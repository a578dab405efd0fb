"""The persistent job queue: the store on its own, and a real server killed mid-queue."""

from __future__ import annotations

import sqlite3
from collections import Counter

import httpx
from server_helpers import ServerProcess, wait_for

from sfumato.server.app import DB_NAME
from sfumato.server.jobs import JobStore, QuotaExceeded


def test_jobs_run_in_order_and_running_ones_are_requeued(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    ids = [store.submit("txt2img", {"prompt": str(i)}).id for i in range(3)]
    assert store.claim_next().id == ids[0]
    assert store.queue_position(ids[2]) == 2
    store.close()

    store = JobStore(tmp_path / "jobs.sqlite3")  # a restart after a crash
    assert store.requeue_running() == 1
    assert [store.claim_next().id for _ in range(3)] == ids
    assert store.claim_next() is None
    assert store.get(ids[0]).attempts == 2


def test_finish_is_once_and_cancel_only_while_queued(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    first, second = (store.submit("txt2img", {"prompt": "x"}).id for _ in range(2))
    store.claim_next()
    assert not store.cancel_queued(first)  # running: the worker must stop it
    assert store.cancel_queued(second)
    assert store.finish(first, "done")
    assert not store.finish(first, "failed")
    assert store.get(first).status == "done"


def test_quota_is_reserved_and_unmade_images_are_given_back(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.submit("txt2img", {"batch_size": 2, "n_iter": 2}, owner="alice", quota=5)
    assert store.usage("alice") == 4
    try:
        store.submit("txt2img", {"batch_size": 2}, owner="alice", quota=5)
        raise AssertionError("over quota was accepted")
    except QuotaExceeded as error:
        assert (error.used, error.quota) == (4, 5)
    store.record_images(job.id, [{"index": 0}, {"index": 1}])
    store.finish(job.id, "interrupted")
    assert store.usage("alice") == 2


def test_sigkill_mid_queue_loses_nothing_and_duplicates_nothing(tmp_path):
    outputs = tmp_path / "out"
    # 1 s per image: the window in which job 2 has exactly 2 of its 4 images outlasts a slow poll on
    # a loaded machine (at 0.3 s per image a CI run beside a training job missed it)
    server = ServerProcess(outputs, "--fake-step-seconds", "0.1")
    body = {"prompt": "x", "steps": 10, "width": 64, "height": 64, "batch_size": 2, "n_iter": 2}
    ids = [httpx.post(server.url + "/api/jobs", json={**body, "seed": 100 * i}).json()["id"]
           for i in range(6)]

    def second_job_half_done():
        job = httpx.get(f"{server.url}/api/jobs/{ids[1]}").json()
        return job["status"] == "running" and len(job["images"]) == 2

    wait_for(second_job_half_done)
    server.kill()
    with sqlite3.connect(outputs / DB_NAME) as db:
        states = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert states[ids[0]] == "done" and states[ids[1]] == "running"
    assert all(states[i] == "queued" for i in ids[2:])

    server = ServerProcess(outputs, "--fake-step-seconds", "0.0")
    try:
        jobs = wait_for(lambda: [j for j in httpx.get(server.url + "/api/jobs").json()
                                 if j["status"] == "done"] if all(
            j["status"] == "done" for j in httpx.get(server.url + "/api/jobs").json()) else None)
    finally:
        server.stop()
    assert sorted(j["id"] for j in jobs) == sorted(ids)
    resumed = next(j for j in jobs if j["id"] == ids[1])
    assert resumed["attempts"] == 2 and [i["seed"] for i in resumed["images"]] == [100, 101, 102, 103]
    pngs = list(outputs.rglob("*.png"))
    assert len(pngs) == 6 * 4 and not list(outputs.rglob("*.tmp"))
    assert Counter(p.name.split("-")[0] for p in pngs) == {i: 4 for i in ids}
