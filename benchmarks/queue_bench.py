"""Queue benchmark: jobs per second and the per-job overhead of the queue around the engine.

    python benchmarks/queue_bench.py [--jobs 200] [--sequential 40] [--model DIR] [--redis URL]

Starts (unless given) a private Redis on a free port and a tiny checkpoint, then one real
`vlq worker` process, and measures two things through the SDK:

- **throughput**: ``--jobs`` jobs submitted at once as one batch (one small inline image each,
  ``max_tokens`` 1): jobs/s from the first submit to the last job finished;
- **overhead**: ``--sequential`` jobs one at a time on an idle worker. For each, end to end is
  the job's ``created_at`` (producer clock) to its record's ``finished_at`` (Redis clock, same
  machine), and the overhead is end to end minus the engine's own time for the job (ChatEngine
  submit -> completion, ``vlq.timings.engine_wall``). It is split into: waiting for delivery
  (submit -> a worker thread has the message), image intake, and the rest (state transitions,
  result write). The client-observed latency (submit call -> ``wait()`` returned) is reported
  too; it adds the SDK's polling interval.

Prints a JSON document (machine, date, command, figures). Not a test: figures depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from producer.client import Client  # noqa: E402
from producer.config import Settings  # noqa: E402
from producer.demo import free_port, ping  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def small_png_uri(size: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 80, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request(image: str, i: int) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": f"What is this? ({i})"}]}], "max_tokens": 1, "temperature": 0}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "p90": round(pct(values, 0.9), 2),
            "mean": round(statistics.fmean(values), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs for the throughput run")
    parser.add_argument("--sequential", type=int, default=40, help="jobs for the overhead run")
    parser.add_argument("--model", type=Path, help="model folder (default: a fresh tiny checkpoint)")
    parser.add_argument("--redis", help="Redis URL (default: a private redis-server on a free port)")
    parser.add_argument("--concurrency", type=int, help="worker threads (default: max_batch_size + 2)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vlq-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        url = args.redis
        if url is None:
            port = free_port()
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL))
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                if ping(url):
                    break
                time.sleep(0.05)
        model = args.model
        if model is None:
            model = work / "tiny"
            tok = REPO.parent / "shared" / "data" / "qwen-vl" / "qwen.tiktoken"
            cmd = [sys.executable, "-m", "engine_build.tiny_model", "--out", str(model)]
            subprocess.run(cmd + (["--tokenizer", str(tok)] if tok.is_file() else []), check=True,
                           stdout=subprocess.DEVNULL)
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "VLQ_BROKER_URL": url, "VLQ_KEY_PREFIX": prefix, "VLQ_BROKER_QUEUE": prefix,
               "VLQ_ENGINE_DEVICE": os.environ.get("VLQ_ENGINE_DEVICE", "cpu")}
        os.environ.update({k: env[k] for k in ("VLQ_BROKER_URL", "VLQ_KEY_PREFIX", "VLQ_BROKER_QUEUE")})
        settings = Settings.load(REPO / "conf")
        client = Client(settings)
        vlq = Path(sys.executable).parent / "vlq"
        worker_cmd = [str(vlq), "worker", "--model", str(model), "--log-level", "WARNING"]
        if args.concurrency:
            worker_cmd += ["--concurrency", str(args.concurrency)]
        log = (work / "worker.log").open("wb")
        procs.append(subprocess.Popen(worker_cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        while not any(i.get("pid") == procs[-1].pid for i in client.store.workers(max_age_s=30).values()):
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                print((work / "worker.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
        image = small_png_uri()

        # warm-up: first-call costs (lazy imports, allocator) are not the queue's
        for h in client.submit_many([request(image, -i) for i in range(1, 5)]):
            h.wait(timeout=120)

        # overhead: one job at a time on an idle worker
        rows = []
        for i in range(args.sequential):
            t0 = time.time()
            handle = client.submit(request(image, i))
            record = handle.wait(timeout=120)
            observed = (time.time() - t0) * 1000
            doc = handle.result()
            t = doc["vlq"]["timings"]
            e2e = (record.finished_at - record.created_at) * 1000
            rows.append({"e2e": e2e, "observed": observed, "engine": t["engine_wall"],
                         "engine_total": t.get("total", 0.0), "overhead": e2e - t["engine_wall"],
                         "delivery": t["job_queue"], "images": t["images"],
                         "rest": e2e - t["engine_wall"] - t["job_queue"] - t["images"]})

        # throughput: a batch submitted at once
        t0 = time.time()
        handles = client.submit_many([request(image, i) for i in range(args.jobs)])
        submitted = time.time() - t0
        records = list(client.as_completed([h.id for h in handles], timeout=1800))
        elapsed = max(r.finished_at for r in records) - min(r.created_at for r in records)
        counts = client.batch(handles[0].batch_id)
        engine_ms = [client.result_of(r)["vlq"]["timings"]["engine_wall"] for r in records[:50]]

        import torch  # only to name the device the worker used

        out = {
            "benchmark": "queue",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "benchmarks/queue_bench.py", *sys.argv[1:]]),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "device": env["VLQ_ENGINE_DEVICE"],
                        "redis": "private redis-server on loopback" if args.redis is None else "given"},
            "model": "tiny random Qwen-VL checkpoint" if args.model is None else str(args.model),
            "job": "one 64x64 inline PNG + a short question, max_tokens 1 (prompt ~290 tokens)",
            "worker": {"threads": args.concurrency or settings.engine.max_batch_size + 2,
                       "max_batch_size": settings.engine.max_batch_size},
            "throughput": {"jobs": args.jobs, "succeeded": counts.succeeded,
                           "jobs_per_s": round(len(records) / elapsed, 2),
                           "submit_s": round(submitted, 3),
                           "submit_jobs_per_s": round(args.jobs / submitted, 1),
                           "engine_wall_ms_median": round(statistics.median(engine_ms), 2)},
            "sequential_ms": {k: summary([r[k] for r in rows]) for k in rows[0]},
        }
        print(json.dumps(out, indent=2))
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
