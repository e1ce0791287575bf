#!/usr/bin/env bash
# Bounded load test on loopback: starts a real `blipsearch serve` (tiny fixture models, captions
# on, a small inference queue) over a temporary copy of the fixture images, drives it for
# LOAD_SECONDS with a mixed workload in Locust (tests/load/locustfile.py: text searches, search
# by image upload and by id, image metadata/thumbnail/file reads, uploads of fresh PNGs, four
# identical uploads at once, re-uploads, deletes of the test's own uploads, deletes racing a
# re-upload of the same file, 16-megapixel searches and uploads, and once eight 49-megapixel
# searches at once), then checks the server (tests/load/report.py) and prints the
# figures: requests per endpoint and status, p50/p95/p99 latency, requests/s, RSS.
#
# Fails when: a response is a 5xx other than 503 with Retry-After, or a 4xx other than
# 408/413/429 (a 404 on an id the test never deleted is a lost image; an upload's 404 "deleted
# meanwhile", when a concurrent delete removed the image it duplicates, is allowed); an upload answered
# 200/201 and not deleted by the test no longer answers GET /api/images/{id} with its bytes'
# hash, .../file with its bytes, or search by id; a deleted id still answers; the collection
# holds anything but the folder images and the kept uploads; the server's peak RSS (VmHWM) is
# over LOAD_RSS_LIMIT_MB.
#
# Needs: cargo, python3 >= 3.11 (Locust 2.47) with venv, PyPI on the first run (~20 s).
# Environment: BLIPSEARCH_BIN (skip the cargo build), LOAD_SECONDS (60), LOAD_USERS (32),
# LOAD_QUEUE (8, the server's --queue-capacity), LOAD_DECODE_MB (256, its --decode-memory-mb),
# LOAD_RESCAN_SECONDS (10, folder rescans run during the load), LOAD_BIG_IMAGES (1; 0 leaves out
# the 16 and 49 megapixel images), LOAD_RSS_LIMIT_MB (see below), LOAD_VENV (target/load-venv),
# ARTIFACT_DIR (target/load: server.log, locust.log and the raw records).
#
# RSS bound (LOAD_RSS_LIMIT_MB, default 1024): over twice the server's measured VmHWM with this
# workload (421 MiB; debug build, 2 CPU cores, 60 s, 32 users, --decode-memory-mb 256). The
# decode budget bounds the decoded pixels alive at once; the rest of the figure is the models,
# the collection's writers and the allocator's working memory. A server without the budget
# takes the eight 49 MP searches alone past 2.4 GiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOAD_SECONDS=${LOAD_SECONDS:-60}
LOAD_USERS=${LOAD_USERS:-32}
LOAD_QUEUE=${LOAD_QUEUE:-8}
LOAD_RESCAN_SECONDS=${LOAD_RESCAN_SECONDS:-10}
LOAD_RSS_LIMIT_MB=${LOAD_RSS_LIMIT_MB:-1024}
LOAD_DECODE_MB=${LOAD_DECODE_MB:-256}
LOAD_VENV=${LOAD_VENV:-$ROOT/target/load-venv}
ARTIFACT_DIR=${ARTIFACT_DIR:-$ROOT/target/load}
mkdir -p "$ARTIFACT_DIR"
rm -f "$ARTIFACT_DIR"/*.jsonl "$ARTIFACT_DIR"/*.log

. tests/serve-lib.sh
python_venv "$LOAD_VENV" tests/load/requirements.txt
PY=$LOAD_VENV/bin/python

blipsearch_bin
scratch_collection load
FOLDER_IMAGES=$(find "$TMP/images" -type f | wc -l)
API_KEY=load-test-key-0123456789
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE_URL=http://127.0.0.1:$PORT
# A small decode memory budget, so that the 16-megapixel images of the workload reach it
# (servers from before the budget have no such flag).
DECODE_ARGS=()
if "$BLIPSEARCH_BIN" serve --help | grep -q -- --decode-memory-mb; then
  DECODE_ARGS=(--decode-memory-mb "$LOAD_DECODE_MB")
fi

serve_fixtures "$ARTIFACT_DIR/server.log" \
  --queue-capacity "$LOAD_QUEUE" \
  --rescan-interval "$LOAD_RESCAN_SECONDS" \
  "${DECODE_ARGS[@]}"
echo "blipsearch serve on $BASE_URL (pid $SERVER_PID, queue $LOAD_QUEUE, ${DECODE_ARGS[*]:-no decode budget}, log $ARTIFACT_DIR/server.log)"

fail() {
  echo "FAIL: $*" >&2
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited" >&2; fi
  echo "---- server.log: $(grep -c -E 'ERROR|WARN|panicked' "$ARTIFACT_DIR/server.log" || true) error/warning lines, the last 15 (full log: $ARTIFACT_DIR/server.log)" >&2
  grep -E 'ERROR|WARN|panicked' "$ARTIFACT_DIR/server.log" | tail -n 15 | sed 's/\x1b\[[0-9;]*m//g' >&2 || true
  exit 1
}

# Wait (at most 120 s) for the first folder sync to finish, then list the folder images' ids.
FIXTURE_IDS=$(BASE_URL=$BASE_URL FOLDER_IMAGES=$FOLDER_IMAGES SERVER_PID=$SERVER_PID "$PY" - <<'PY'
import json, os, sys, time, urllib.request
base, want, pid = os.environ["BASE_URL"], int(os.environ["FOLDER_IMAGES"]), os.environ["SERVER_PID"]
def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""
deadline = time.time() + 120
while True:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("the server exited")
    s, body = get("/api/status")
    if s == 200:
        st = json.loads(body)
        ing = st["ingest"]
        if ing["last_error"]:
            sys.exit(f"folder ingest failed: {ing['last_error']}")
        if ing["state"] == "idle" and ing["last_run_unix"] and st["images"] == want:
            break
    if time.time() > deadline:
        sys.exit(f"the folder ingest did not finish in 120 s (last status {s})")
    time.sleep(0.5)
ids = [i for i in range(4 * want + 16) if get(f"/api/images/{i}")[0] == 200]
if len(ids) != want:
    sys.exit(f"found ids {ids}, expected {want} folder images")
print(",".join(map(str, ids)))
PY
) || fail "the server did not get ready"
echo "folder images indexed: ids $FIXTURE_IDS"

export LOAD_OUT=$ARTIFACT_DIR API_KEY SERVER_PID FIXTURE_IDS BASE_URL LOAD_SECONDS \
  LOAD_RSS_LIMIT_MB FIXTURE_DIR=$TMP/images UPLOADS_DIR=$TMP/index/uploads
echo "load: $LOAD_USERS users for $LOAD_SECONDS s (Locust log $ARTIFACT_DIR/locust.log)"
# --stop-timeout lets every user finish its request in flight, so that no upload the server
# commits goes unrecorded. Locust's own exit status is ignored: report.py judges the records.
timeout $((LOAD_SECONDS + 150)) "$LOAD_VENV/bin/locust" -f tests/load/locustfile.py --headless --only-summary \
  --users "$LOAD_USERS" --spawn-rate "$LOAD_USERS" --run-time "${LOAD_SECONDS}s" \
  --stop-timeout 90 --host "$BASE_URL" --loglevel WARNING \
  >"$ARTIFACT_DIR/locust.log" 2>&1 || true
if grep -q Traceback "$ARTIFACT_DIR/locust.log"; then
  tail -n 40 "$ARTIFACT_DIR/locust.log" >&2
  fail "the Locust workload raised (see above)"
fi
kill -0 "$SERVER_PID" 2>/dev/null || fail "the server died under load"
timeout 150 "$PY" tests/load/report.py || fail "load checks failed (figures above)"
