"""After the load: checks the still-running server and prints the figures (tests/load/run.sh).

Reads what tests/load/locustfile.py wrote to LOAD_OUT, then
  1. every response was 2xx, 408, 413, 429 or 503 with Retry-After (a 404 on an id the test
     never deleted is a lost image; a 5xx other than 503 + Retry-After is a server error);
  2. every upload answered 200/201 whose id the test did not delete still answers 200 on
     GET /api/images/{id} with the uploaded bytes' hash, serves those bytes on .../file, and is
     searchable by id; every id the test deleted answers 404;
  3. the collection holds the folder images plus those uploads, nothing else;
  4. the server's peak RSS (VmHWM) is under LOAD_RSS_LIMIT_MB.
Exits 1 when a check fails. Standard library only.
"""

import collections
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request

OUT = os.environ["LOAD_OUT"]
BASE = os.environ["BASE_URL"]
PID = int(os.environ["SERVER_PID"])
SECONDS = float(os.environ["LOAD_SECONDS"])
FIXTURES = len([x for x in os.environ["FIXTURE_IDS"].split(",") if x])
RSS_LIMIT_MB = float(os.environ["LOAD_RSS_LIMIT_MB"])
ALLOWED = {408, 413, 429}  # besides 2xx and 503 with Retry-After


def load(name):
    path = os.path.join(OUT, f"{name}.jsonl")
    if not os.path.exists(path):
        sys.exit(f"FAIL: {path} is missing (did locust run?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# The checks below make three requests per kept upload; all of them get this long together.
DEADLINE = time.monotonic() + 90
late = []


def call(method, path, body=None, headers=None):
    left = DEADLINE - time.monotonic()
    if left <= 0:
        late.append(path)
        return 0, b"not sent: the checks ran out of time"
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=min(30, left)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:  # refused, reset, timed out
        return 0, str(e).encode()


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v) + 0.5) - 1))]


def proc_status(field):
    try:
        with open(f"/proc/{PID}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


records, uploads, deletes, rss = (load(n) for n in ("requests", "uploads", "deletes", "rss"))
failures = []

# 1. Statuses.
by_endpoint = collections.defaultdict(list)
for r in records:
    by_endpoint[r["endpoint"]].append(r)
bad = collections.Counter()
example = {}  # a response body per kind of bad answer
busy_503 = 0
deleted_meanwhile = 0
for r in records:
    s = r["status"]
    if s == 503 and r["retry_after"]:
        busy_503 += 1
    elif (s == 404 and r["endpoint"] == "POST /api/images (re-upload during delete)"
          and "deleted meanwhile" in (r.get("body") or "")):
        # The server's documented answer when an upload's bytes match an image that a
        # concurrent delete removes: nothing is stored, nothing is lost.
        deleted_meanwhile += 1
    elif not (200 <= s < 300 or s in ALLOWED):
        bad[(r["endpoint"], s, r["error"])] += 1
        example.setdefault((r["endpoint"], s, r["error"]), r.get("body"))
for (endpoint, s, err), n in sorted(bad.items(), key=lambda kv: -kv[1]):
    why = ("server error" if s >= 500 else "lost image: 404 on an id the test never deleted"
           if s == 404 else "connection failed: " + str(err) if s == 0 else
           "a success without its JSON body" if s == -1 else "unexpected status")
    failures.append(f"{n} x {s} on {endpoint} ({why})")
    if example.get((endpoint, s, err)):
        failures.append(f"    e.g. {example[(endpoint, s, err)][:160]}")


n = sum(u["status"] == -1 for u in uploads)
if n:
    failures.append(f"{n} uploads answered 200/201 without the promised JSON (id, duplicate)")

# 2. Committed uploads.
deleted = {d["id"] for d in deletes if d["status"] == 200}
uncertain = {d["id"] for d in deletes if d["status"] != 200 and d["status"] != 404}
committed = collections.defaultdict(set)  # id -> sha256 of what was sent
for u in uploads:
    if u["status"] in (200, 201) and u["id"] is not None:
        committed[u["id"]].add(u["sha256"])
live = {i: shas for i, shas in committed.items() if i not in deleted and i not in uncertain}
lost = []
live_paths = set()
for i, shas in sorted(live.items()):
    if len(shas) > 1:
        lost.append(f"id {i} was answered for {len(shas)} different images")
        continue
    sha = next(iter(shas))
    # With the key: the server shows full paths (for the leak count below) only to key holders.
    s, body = call("GET", f"/api/images/{i}", headers={"X-Api-Key": os.environ["API_KEY"]})
    if s != 200:
        lost.append(f"id {i}: GET /api/images/{i} -> {s} {body[:160]!r}")
        continue
    meta = json.loads(body)
    live_paths.add(os.path.realpath(meta.get("path", "")))
    if meta.get("content_hash") != sha:
        lost.append(f"id {i}: content_hash is not the uploaded bytes' hash")
    s, body = call("GET", f"/api/images/{i}/file")
    if s != 200:
        lost.append(f"id {i}: GET /api/images/{i}/file -> {s} {body[:160]!r}")
    elif hashlib.sha256(body).hexdigest() != sha:
        lost.append(f"id {i}: /file serves other bytes than were uploaded")
    s, body = call("POST", "/api/search/image?limit=1", json.dumps({"similar_to": i}).encode(),
                   {"Content-Type": "application/json"})
    if s != 200:
        lost.append(f"id {i}: search by id -> {s} {body[:160]!r}")
for i in sorted(deleted):
    s, _ = call("GET", f"/api/images/{i}")
    if s != 404:
        failures.append(f"id {i} was deleted (200) but GET answers {s}")
if lost:
    failures.append(f"{len(lost)} of {len(live)} committed uploads are lost or wrong:")
    failures.extend("  " + x for x in lost[:20])
    if len(lost) > 20:
        failures.append(f"  ... and {len(lost) - 20} more")
by_sha = collections.defaultdict(set)
for i, shas in live.items():
    for sha in shas:
        by_sha[sha].add(i)
split = {sha: ids for sha, ids in by_sha.items() if len(ids) > 1}
if split:
    failures.append(f"{len(split)} images were stored under several ids (identical bytes), "
                    f"e.g. ids {sorted(next(iter(split.values())))}")

# 3. Nothing else in the collection.
s, body = call("GET", "/api/status")
status = json.loads(body) if s == 200 else {}
expected = FIXTURES + len(live)
if status.get("images") != expected:
    failures.append(f"the collection holds {status.get('images')} images, expected {expected} "
                    f"({FIXTURES} folder images + {len(live)} uploads kept)")
if status.get("ingest", {}).get("last_error"):
    failures.append(f"folder ingest error: {status['ingest']['last_error']}")

# Files left in the uploads folder that no kept upload uses (a leak, reported, not a failure).
uploads_dir = os.environ.get("UPLOADS_DIR", "")
orphans = sorted(
    n for n in (os.listdir(uploads_dir) if os.path.isdir(uploads_dir) else [])
    if os.path.realpath(os.path.join(uploads_dir, n)) not in live_paths
)

if late:
    failures.append(f"the server answered too slowly: {len(late)} check requests were not sent "
                    f"within 90 s")

# 4. Memory.
hwm_kb = proc_status("VmHWM")
peak_kb = max([kb for _, kb in rss] + [hwm_kb or 0])
if hwm_kb is None:
    failures.append("the server is gone: cannot read its VmHWM")
elif peak_kb / 1024 > RSS_LIMIT_MB:
    failures.append(f"peak RSS {peak_kb / 1024:.0f} MiB is over the bound of "
                    f"{RSS_LIMIT_MB:.0f} MiB")

# Figures.
print()
# From the first request sent to the last answered: the load plus the drain of requests in
# flight when it stopped.
span = max(1e-3, max((r["t"] + r["ms"] / 1000 for r in records), default=0)
           - min((r["t"] for r in records), default=0))
print(f"== load: {len(records)} requests in {span:.0f} s ({SECONDS:.0f} s of load, then the "
      f"requests in flight) = {len(records) / span:.1f} req/s, "
      f"{sum(200 <= r['status'] < 300 for r in records) / span:.1f} 2xx/s")
w = max(len(e) for e in by_endpoint) if by_endpoint else 10
print(f"{'endpoint':<{w}}  {'n':>5}  {'statuses':<28}  {'p50 ms':>7}  {'p95 ms':>7}  "
      f"{'p99 ms':>7}")
for e in sorted(by_endpoint):
    rs = by_endpoint[e]
    counts = collections.Counter(r["status"] for r in rs)
    st = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
    ms = [r["ms"] for r in rs]
    print(f"{e:<{w}}  {len(rs):>5}  {st:<28}  {pct(ms, 50):>7.1f}  {pct(ms, 95):>7.1f}  "
          f"{pct(ms, 99):>7.1f}")
all_ms = [r["ms"] for r in records]
total = collections.Counter(r["status"] for r in records)
print(f"{'all':<{w}}  {len(records):>5}  "
      f"{' '.join(f'{k}:{v}' for k, v in sorted(total.items())):<28}  "
      f"{pct(all_ms, 50):>7.1f}  {pct(all_ms, 95):>7.1f}  {pct(all_ms, 99):>7.1f}")
ok_ms = [r["ms"] for r in records if 200 <= r["status"] < 300]
print(f"{'all 2xx':<{w}}  {len(ok_ms):>5}  {'':<28}  {pct(ok_ms, 50):>7.1f}  "
      f"{pct(ok_ms, 95):>7.1f}  {pct(ok_ms, 99):>7.1f}")
print()
kinds = collections.Counter((u["kind"], u["status"], u["duplicate"]) for u in uploads)
print("uploads (kind, status, duplicate): "
      + ", ".join(f"{k}/{s}/{d}: {n}" for (k, s, d), n in sorted(kinds.items(), key=str)))
print(f"committed uploads: {len(committed)} ids, {len(deleted)} deleted by the test, "
      f"{len(live)} kept and checked, {len(lost)} lost or wrong; "
      f"collection: {status.get('images')} images (expected {expected})")
print(f"files in the uploads folder that no kept upload uses (leaked, not a failure): "
      f"{len(orphans)}" + (f", e.g. {orphans[:3]}" if orphans else ""))
print(f"uploads answered 404 because a concurrent delete removed the image they duplicate "
      f"(allowed): {deleted_meanwhile}")
print(f"503 with Retry-After (memory budget or busy, allowed): {busy_503}")
first = rss[0][1] / 1024 if rss else float("nan")
print(f"server RSS: {first:.0f} MiB at start, peak sampled {max([kb for _, kb in rss] + [0]) / 1024:.0f} "
      f"MiB ({len(rss)} samples), VmHWM {(hwm_kb or 0) / 1024:.0f} MiB, "
      f"bound {RSS_LIMIT_MB:.0f} MiB")
print()
if failures:
    print(f"FAIL: {len(failures)} check(s) failed:")
    for f in failures:
        print("  " + f)
    sys.exit(1)
print("PASS: no server errors, no lost uploads, RSS within bound")
