#!/usr/bin/env bash
# The end-to-end demo (`make demo`), on a CPU machine with nothing else running:
#   1. sample images (generated), 2. Redis (a reachable one, else our own on a free port),
#   3. the tiny checkpoint (taught to outline the squares), 4. a worker in the background,
#   5. `vlq annotate` over the images, 6. where the results are; then it stops what it started.
# Everything lands in ./demo (DEMO_DIR). A reachable Redis is shared safely: the demo's keys and
# queue carry a prefix of their own, and nothing is flushed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${DEMO_PYTHON:-python}
DEMO=${DEMO_DIR:-demo}
PROMPT=${DEMO_PROMPT:-"Outline the square."}
TOKENIZER=${VLQ_TOKENIZER:-../shared/data/qwen-vl/qwen.tiktoken}
mkdir -p "$DEMO"
DEMO=$(cd "$DEMO" && pwd)

REDIS_PID="" WORKER_PID=""
cleanup() {
  if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
    echo "stopped the worker"
  fi
  if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    echo "stopped the demo's Redis"
  fi
}
trap cleanup EXIT

echo "== 1. sample images"
"$PY" -m producer.demo images --out "$DEMO/images" --examples "$DEMO/teach.jsonl" --prompt "$PROMPT"

echo "== 2. Redis"
URL=${VLQ_BROKER_URL:-redis://127.0.0.1:6379/0}
if "$PY" -m producer.demo ping "$URL"; then
  echo "using the Redis at $URL (under a key prefix of the demo's own)"
else
  command -v redis-server >/dev/null || {
    echo "no Redis at $URL and no redis-server to start: install Redis (apt-get install redis-server)" >&2
    exit 1
  }
  PORT=$("$PY" -m producer.demo free-port)
  mkdir -p "$DEMO/redis"
  redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DEMO/redis" --appendonly yes \
    --save "" --daemonize no --loglevel warning >"$DEMO/redis/redis.log" 2>&1 &
  REDIS_PID=$!
  URL="redis://127.0.0.1:$PORT/0"
  for _ in $(seq 50); do "$PY" -m producer.demo ping "$URL" && break; sleep 0.1; done
  echo "started a Redis of the demo's own at $URL"
fi
RUN=demo-$(date +%s)
export VLQ_BROKER_URL="$URL" VLQ_KEY_PREFIX="$RUN" VLQ_BROKER_QUEUE="$RUN"
export VLQ_IMAGES_ALLOWED_ROOTS="[\"$DEMO/images\"]" VLQ_ENGINE_DEVICE=${VLQ_ENGINE_DEVICE:-cpu}

echo "== 3. tiny checkpoint"
if [[ ! -f "$DEMO/model/model.safetensors" ]]; then
  TOK_ARGS=()
  if [[ -f "$TOKENIZER" ]]; then TOK_ARGS=(--tokenizer "$TOKENIZER"); echo "with the real tokenizer $TOKENIZER"; fi
  rm -rf "$DEMO/model"
  "$PY" -m engine_build.tiny_model --out "$DEMO/model" "${TOK_ARGS[@]}" --teach "$DEMO/teach.jsonl"
else
  echo "reusing $DEMO/model"
fi

echo "== 4. worker"
vlq worker --model "$DEMO/model" >"$DEMO/worker.log" 2>&1 &
WORKER_PID=$!
if ! "$PY" -m producer.demo wait-worker --pid "$WORKER_PID" --timeout 300; then
  echo "the worker did not come up; its log:" >&2
  tail -n 30 "$DEMO/worker.log" >&2
  exit 1
fi
echo "worker $WORKER_PID is serving queue $RUN (log: $DEMO/worker.log)"

echo "== 5. annotate"
rm -f "$DEMO/results.jsonl"
vlq annotate "$DEMO/images" --prompt "$PROMPT" --out "$DEMO/results.jsonl" --temperature 0 --max-tokens 64 --scores
echo "second run (everything is done already):"
vlq annotate "$DEMO/images" --prompt "$PROMPT" --out "$DEMO/results.jsonl" --temperature 0 --max-tokens 64 --scores

echo "== 6. results"
"$PY" -m producer.demo show "$DEMO/results.jsonl"
echo
echo "results: $DEMO/results.jsonl (one JSON line per image)"
if [[ -n "$REDIS_PID" ]]; then
  echo "job records and full results were in the demo's own Redis, which stops now (its AOF stays in $DEMO/redis)"
else
  JOB=$(head -1 "$DEMO/results.jsonl" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  echo "job records and full results: Redis $URL, keys $RUN:* (they expire after store.ttl_s), e.g."
  echo "  VLQ_BROKER_URL=$URL VLQ_KEY_PREFIX=$RUN vlq result $JOB"
fi
