"""Mixed workload for tests/load/run.sh: searches, uploads, deletes and image reads against one
`blipsearch serve`, with enough users that the inference queue fills (429s are expected).

Every response goes to LOAD_OUT/requests.jsonl; every upload to LOAD_OUT/uploads.jsonl (what
was sent and what came back), every delete to LOAD_OUT/deletes.jsonl, and the server's RSS
(sampled from /proc/SERVER_PID/status) to LOAD_OUT/rss.jsonl. tests/load/report.py reads them,
checks the server afterwards and prints the figures.

Environment: LOAD_OUT, API_KEY, SERVER_PID, FIXTURE_IDS (comma-separated ids of the folder
images), FIXTURE_DIR (their files, for search by image upload), LOAD_SECONDS (when the 49 MP
burst goes), LOAD_BIG_IMAGES (0: no 16 or 49 MP images).
"""

import hashlib
import itertools
import json
import os
import random
import struct
import time
import zlib

import gevent
from gevent.pool import Pool
from locust import HttpUser, events, task
from locust.clients import HttpSession

OUT = os.environ["LOAD_OUT"]
API_KEY = os.environ["API_KEY"]
SERVER_PID = int(os.environ["SERVER_PID"])
FIXTURE_IDS = [int(x) for x in os.environ["FIXTURE_IDS"].split(",") if x]
FIXTURE_DIR = os.environ["FIXTURE_DIR"]
AUTH = {"X-Api-Key": API_KEY}
BIG = os.environ.get("LOAD_BIG_IMAGES", "1") != "0"  # the 16 and 49 MP images (on by default)

QUERIES = [
    "a cat", "an astronaut in space", "a red rocket", "a cup of coffee", "a motorcycle",
    "a camera on a table", "a man with a camera", "cat sleeping", "rocket launch",
    "coffee", "photo of a dog on a beach", "black and white photo",
]

records = []  # one dict per response
uploads = []  # one dict per upload answered
deletes = []  # one dict per delete answered
rss = []  # (seconds since start, VmRSS kB)
started = time.time()
counter = itertools.count()
# Images other users may read and search by: the folder images and kept uploads. Uploads meant
# for deleting go to `deletable` only, so that no read races a delete the test itself sent: a
# 404 on a readable id is a lost image.
readable = list(FIXTURE_IDS)
deletable = []  # (id, bytes, file name)
kept = []  # (id, bytes, file name) of kept unique uploads
fixture_bytes = [
    open(os.path.join(FIXTURE_DIR, n), "rb").read() for n in sorted(os.listdir(FIXTURE_DIR))
]


def png(seed: int, size: int = 48) -> bytes:
    """A small RGB PNG whose pixels depend on `seed` (unique bytes per seed), stdlib only."""
    rng = random.Random(seed)
    base = [rng.randrange(256) for _ in range(3)]
    rows = []
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            row += bytes(((base[0] + 4 * x) % 256, (base[1] + 4 * y) % 256,
                          (base[2] + rng.randrange(32)) % 256))
        rows.append(bytes(row))
    raw = b"".join(rows)
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


# A decompression-heavy image: 4000x4000 RGB (16 megapixels, 48 MB decoded) in ~190 KB of PNG,
# for the server's decode memory. Built once; a tEXt chunk makes each upload's bytes unique.
BIG_SIDE = 4000
_row = b"\x00" + (bytes(range(256)) * (3 * BIG_SIDE // 256 + 1))[:3 * BIG_SIDE]
BIG_IDAT = chunk(b"IDAT", zlib.compress(_row * BIG_SIDE, 9))
del _row


def big_png(nonce: str = "") -> bytes:
    ihdr = struct.pack(">IIBBBBB", BIG_SIDE, BIG_SIDE, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"tEXt", b"Comment\x00" + nonce.encode()) + BIG_IDAT + chunk(b"IEND", b""))


BIG_QUERY = big_png("query")


def huge_png(side: int = 7000) -> bytes:
    """A 7000x7000 RGB PNG (49 megapixels, 147 MB decoded) of ~0.6 MB, compressed row by row."""
    row = b"\x00" + (bytes(range(256)) * (3 * side // 256 + 1))[:3 * side]
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def huge_burst(environment):
    """Once per run, at 40% of it: eight searches by a 49 MP image at once. Without a decode
    budget they decode side by side (2 GiB and more); with one, they wait their turn, get 429, or
    get 413 when one alone is over the budget."""
    data = huge_png()
    gevent.sleep(max(0.0, 0.4 * float(os.environ.get("LOAD_SECONDS", "60"))
                     - (time.time() - started)))

    def one():
        s = HttpSession(environment.host, environment.events.request, None)
        with s.post("/api/search/image?limit=3", name="/api/search/image (49 MP, 8 at once)",
                    files={"image": ("huge.png", data)}, catch_response=True) as r:
            r.success()

    pool = Pool(8)
    for _ in range(8):
        pool.spawn(one)
    pool.join()


def fresh_png() -> bytes:
    # Seeds differ per process and per call, so the bytes are new to the server.
    return png(hash((os.getpid(), started, next(counter))))


@events.request.add_listener
def on_request(request_type, name, response_time, response, exception, start_time=None,
               **_kw):
    status = getattr(response, "status_code", 0) or 0
    headers = getattr(response, "headers", None) or {}
    records.append({
        "t": round((start_time or time.time()) - started, 3),
        "endpoint": f"{request_type} {name}",
        "status": status,
        "ms": round(response_time, 2),
        "retry_after": headers.get("Retry-After"),
        "error": None if status else str(exception)[:200],
        # The JSON error of a refusal, to tell apart refusals with one status.
        "body": None if status < 400 or response is None else (response.text or "")[:200],
    })


def sample_rss():
    while True:
        try:
            with open(f"/proc/{SERVER_PID}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss.append((round(time.time() - started, 2), int(line.split()[1])))
        except OSError:
            return
        gevent.sleep(0.25)


@events.test_start.add_listener
def on_test_start(environment, **_kw):
    gevent.spawn(sample_rss)
    if BIG:
        gevent.spawn(huge_burst, environment)


@events.quitting.add_listener
def on_quitting(**_kw):
    for name, rows in (("requests", records), ("uploads", uploads), ("deletes", deletes),
                       ("rss", rss)):
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def ok(resp) -> bool:
    return resp is not None and resp.status_code < 400


class Visitor(HttpUser):
    # No think time: the point is to keep the inference queue at its limit.
    wait_time = staticmethod(lambda: random.uniform(0, 0.05))

    def on_start(self):
        # Separate sessions for concurrent identical uploads (one requests session is not
        # meant to be shared by concurrent greenlets).
        self.burst_clients = [
            HttpSession(self.host, self.environment.events.request, self) for _ in range(4)
        ]

    def _get(self, path, name):
        with self.client.get(path, name=name, catch_response=True) as r:
            r.success()  # statuses are judged by report.py from requests.jsonl
            return r

    def _post_upload(self, client, data, file_name, kind, keep):
        with client.post("/api/images", name=f"/api/images ({kind})", headers=AUTH,
                         files={"image": (file_name, data, "image/png")},
                         catch_response=True) as r:
            r.success()
            entry = {"kind": kind, "file_name": file_name, "status": r.status_code,
                     "sha256": hashlib.sha256(data).hexdigest(), "id": None,
                     "duplicate": None, "keep": keep}
            if r.status_code in (200, 201):
                try:
                    body = r.json()
                    entry["id"], entry["duplicate"] = body["id"], body["duplicate"]
                except (ValueError, KeyError):
                    entry["status"] = -1  # a success without the promised body
            uploads.append(entry)
            return entry

    @task(30)
    def search_text(self):
        q = random.choice(QUERIES)
        self._get(f"/api/search?q={q.replace(' ', '+')}&limit=5", "/api/search?q")

    @task(8)
    def search_by_upload(self):
        data = random.choice(fixture_bytes) if random.random() < 0.5 else fresh_png()
        with self.client.post("/api/search/image?limit=5", name="/api/search/image (multipart)",
                              files={"image": ("query.png", data)}, catch_response=True) as r:
            r.success()

    @task(3)
    def search_by_big_upload(self):
        if not BIG:
            return
        with self.client.post("/api/search/image?limit=5",
                              name="/api/search/image (multipart 16 MP)",
                              files={"image": ("big.png", BIG_QUERY)}, catch_response=True) as r:
            r.success()

    @task(8)
    def search_by_id(self):
        with self.client.post("/api/search/image?limit=5", name="/api/search/image (json id)",
                              json={"similar_to": random.choice(readable)}, catch_response=True) as r:
            r.success()

    @task(12)
    def read_image(self):
        i = random.choice(readable)
        kind = random.choice(["", "/thumbnail", "/file"])
        self._get(f"/api/images/{i}{kind}", f"/api/images/{{id}}{kind}")

    @task(8)
    def upload_unique(self):
        keep = random.random() < 0.5
        data, name = fresh_png(), f"u{next(counter)}.png"
        e = self._post_upload(self.client, data, name, "unique", keep)
        if e["status"] in (200, 201):
            if keep:
                readable.append(e["id"])
                kept.append((e["id"], data, name))
            else:
                deletable.append((e["id"], data, name))

    @task(1)
    def upload_big(self):
        if not BIG:
            return
        data = big_png(f"{os.getpid()}-{started}-{next(counter)}")
        e = self._post_upload(self.client, data, f"big{next(counter)}.png", "16 MP", True)
        if e["status"] in (200, 201):
            readable.append(e["id"])

    @task(3)
    def upload_same_bytes_concurrently(self):
        # Four uploads of one new image at once: two with the same file name, two with others.
        data = fresh_png()
        names = ["same.png", "same.png", f"other{next(counter)}.png", "photo.png"]
        pool = Pool(4)
        jobs = [pool.spawn(self._post_upload, c, data, n, "same bytes x4", True)
                for c, n in zip(self.burst_clients, names)]
        pool.join()
        readable.extend({j.value["id"] for j in jobs
                         if j.value and j.value["status"] in (200, 201)})

    @task(2)
    def reupload_kept(self):
        # The same bytes and name again, later: a duplicate of a kept image.
        if kept:
            _, data, name = random.choice(kept)
            self._post_upload(self.client, data, name, "re-upload", True)

    def _delete(self, client, i):
        with client.delete(f"/api/images/{i}", name="/api/images/{id}", headers=AUTH,
                           catch_response=True) as r:
            r.success()
            deletes.append({"id": i, "status": r.status_code})

    @task(3)
    def delete_own(self):
        if deletable:
            i, _, _ = deletable.pop(random.randrange(len(deletable)))
            self._delete(self.client, i)

    @task(2)
    def delete_while_reuploading(self):
        # Delete an upload while the same bytes under the same name are uploaded again: the
        # upload may answer the old id (then deleted) or a new one, which must survive.
        if deletable:
            i, data, name = deletable.pop(random.randrange(len(deletable)))
            pool = Pool(2)
            pool.spawn(self._delete, self.burst_clients[0], i)
            pool.spawn(self._post_upload, self.burst_clients[1], data, name,
                       "re-upload during delete", True)
            pool.join()
