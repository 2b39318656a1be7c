"""Helpers for ``scripts/demo.sh`` (``make demo``): sample images, Redis checks, waiting, a summary.

    python -m producer.demo images --out demo/images --examples demo/teach.jsonl --prompt TEXT
    python -m producer.demo ping redis://127.0.0.1:6379/0      # exit 0 when Redis answers
    python -m producer.demo free-port
    python -m producer.demo wait-worker --pid PID [--timeout S] # until the worker registers
    python -m producer.demo show demo/results.jsonl

The images are generated here (PIL): each is a plain background with one coloured square at a
random place. ``--examples`` also writes, per image, the grounding answer a good model gives
(``<ref>the red square</ref><box>(x1,y1),(x2,y2)</box>`` on Qwen-VL's 0..1000 grid), which the
demo teaches its tiny random checkpoint so that the whole pipeline returns real boxes.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from pathlib import Path

SQUARES = [  # (name, colour, image size)
    ("red", (220, 40, 40), (640, 480)),
    ("blue", (40, 70, 220), (480, 640)),
    ("green", (40, 170, 60), (800, 600)),
    ("orange", (245, 150, 30), (512, 512)),
]


def make_images(out: Path, examples: Path | None, prompt: str, seed: int = 0) -> list[Path]:
    """Write the sample images under ``out`` (two in a subfolder); optionally the teaching file."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    lines, paths = [], []
    for i, (name, colour, (w, h)) in enumerate(SQUARES):
        image = Image.new("RGB", (w, h), (236, 234, 226))
        side = rng.randint(min(w, h) // 6, min(w, h) // 3)
        x1, y1 = rng.randint(0, w - side - 1), rng.randint(0, h - side - 1)
        x2, y2 = x1 + side, y1 + side
        ImageDraw.Draw(image).rectangle([x1, y1, x2, y2], fill=colour)
        path = out / ("more" if i >= 2 else ".") / f"{i + 1}-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
        box = [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000), round(y2 / h * 1000)]
        answer = f"<ref>the {name} square</ref><box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"
        request = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": path.resolve().as_uri()}},
            {"type": "text", "text": prompt}]}]}
        lines.append(json.dumps({"request": request, "answer": answer}, ensure_ascii=False))
    if examples is not None:
        examples.parent.mkdir(parents=True, exist_ok=True)
        examples.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def ping(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.ConnectionError, redis.TimeoutError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_worker(pid: int, timeout: float) -> bool:
    """Wait until the worker process ``pid`` registers in Redis (its engine is loaded)."""
    import os

    from producer.config import Settings
    from producer.state import JobStore

    store = JobStore.from_settings(Settings.load())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return False  # it exited
        if any(info.get("pid") == pid for info in store.workers(max_age_s=30).values()):
            return True
        time.sleep(0.2)
    return False


def show(results: Path) -> None:
    """Print the latest line per image: answer and boxes in pixels (with their scores, if any)."""
    latest: dict[str, dict] = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        latest[row["path"]] = row
    for path, row in sorted(latest.items()):
        if row["status"] != "succeeded":
            print(f"  {path}: {row['status']} [{(row.get('error') or {}).get('code')}]")
            continue
        boxes = "; ".join(
            f"{b.get('phrase')} at {[round(v) for v in b['box_pixels']]} px"
            + (f", score {b['score']:.3f}" if b.get("score") is not None else "")
            for b in row.get("boxes") or [] if b.get("box_pixels")
        )
        print(f"  {path}: {row['answer']!r}" + (f"\n      -> {boxes}" if boxes else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producer.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--examples", type=Path)
    p.add_argument("--prompt", required=True)
    p = sub.add_parser("ping")
    p.add_argument("url")
    sub.add_parser("free-port")
    p = sub.add_parser("wait-worker")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300)
    p = sub.add_parser("show")
    p.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "images":
        paths = make_images(args.out, args.examples, args.prompt)
        print(f"{len(paths)} sample images in {args.out}")
    elif args.cmd == "ping":
        return 0 if ping(args.url) else 1
    elif args.cmd == "free-port":
        print(free_port())
    elif args.cmd == "wait-worker":
        return 0 if wait_worker(args.pid, args.timeout) else 1
    elif args.cmd == "show":
        show(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
