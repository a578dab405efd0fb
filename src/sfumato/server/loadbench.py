"""`sfumato bench load`: many concurrent A1111 clients against a real server process.

Starts `sfumato serve` on a free loopback port, sends N txt2img requests from C concurrent
clients (after one warm-up request), then reads the job records: completed, failed, lost (accepted but never finished, or
never answered: the goal is 0), queue latency (job start - submission) and server memory.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(outputs: Path, model: str | None, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "from sfumato.cli import main; main()", "serve",
               "--port", str(port), "--outputs", str(outputs), "--max-queue", "100000"]
    command += ["--model", model] if model else []
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    # urllib, not httpx: `bench speed` waits for a server too, and httpx is only a test dependency
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise click.ClickException(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise click.ClickException("server did not start")


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run_clients(url: str, requests: int, concurrency: int, body: dict) -> list[tuple[int, float]]:
    """(HTTP status or -1 for a transport error, seconds) per request."""
    import httpx

    def client(n: int) -> list[tuple[int, float]]:
        results = []
        with httpx.Client(timeout=None) as http:
            for _ in range(n):
                start = time.perf_counter()
                try:
                    status = http.post(url + "/sdapi/v1/txt2img", json=body).status_code
                except httpx.TransportError:
                    status = -1
                results.append((status, time.perf_counter() - start))
        return results

    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        return [r for part in pool.map(client, shares) for r in part]


@click.command()
@click.option("--model", help="Model file or folder (default: the built-in model).")
@click.option("--requests", "count", default=200, show_default=True)
@click.option("--concurrency", default=16, show_default=True)
@click.option("--steps", default=2, show_default=True)
@click.option("--size", default=64, show_default=True, help="Width and height of each image.")
def load_command(model: str | None, count: int, concurrency: int, steps: int, size: int) -> None:
    """Load test: N txt2img requests from C concurrent clients against a fresh server."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="sfumato-load-") as outputs:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(Path(outputs), model, port)
        try:
            wait_healthy(url, process)
            rss_idle = rss_mib(process.pid)
            body = {"prompt": "a red star above a blue circle", "steps": steps, "width": size,
                    "height": size, "sampler_name": "Euler"}
            httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=None)  # model loaded, warm
            rss_before = rss_mib(process.pid)
            start = time.perf_counter()
            results = run_clients(url, count, concurrency, body)
            elapsed = time.perf_counter() - start
            rss_after = rss_mib(process.pid)
            jobs = httpx.get(url + "/api/jobs", params={"limit": 100000}).json()
        finally:
            process.terminate()
            process.wait(30)

    jobs = jobs[:-1]  # the oldest: the warm-up request
    done = [j for j in jobs if j["status"] == "done"]
    failed = sum(1 for status, _ in results if status not in (200, -1))
    unfinished = sum(1 for j in jobs if j["status"] in ("queued", "running"))
    unanswered = sum(1 for status, _ in results if status == -1)
    queue = [j["started"] - j["created"] for j in jobs if j["started"]]
    latency = [seconds for status, seconds in results if status == 200]
    click.echo(f"requests {count} from {concurrency} clients in {elapsed:.1f} s "
               f"({len(done) / elapsed:.2f} images/s)")
    click.echo(f"completed {len(done)}  failed {failed}  lost {unfinished + unanswered}")
    click.echo(f"queue latency  p50 {percentile(queue, 0.5):.2f} s  p95 {percentile(queue, 0.95):.2f} s")
    click.echo(f"request latency  p50 {percentile(latency, 0.5):.2f} s  "
               f"p95 {percentile(latency, 0.95):.2f} s")
    click.echo(f"server RSS  idle {rss_idle:.0f} MiB  warm (before) {rss_before:.0f} MiB  "
               f"after {rss_after:.0f} MiB")
