"""Manual probe of a running server's memory across rounds of decode-heavy requests.

    python3 tests/load/memprobe.py PORT PID [ROUNDS] [API_KEY]

Each round sends eight searches by a 16-megapixel PNG (48 MB decoded, ~190 KB sent) and two
uploads of new 16 MP PNGs at once, then prints the server's VmRSS and VmHWM (from
/proc/PID/status). With a decode budget the memory held by decoded images at any moment is
bounded, so VmHWM should level off after the first round or two; a climb over many rounds is
memory the process keeps after the requests end (e.g. glibc's per-thread malloc arenas: compare
a server started with MALLOC_ARENA_MAX=2). Loopback only; bounded by ROUNDS (default 8) and a
120 s timeout per request. Standard library only.
"""

import collections
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib

PORT, PID = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
KEY = sys.argv[4] if len(sys.argv) > 4 else "load-test-key-0123456789"
SIDE = 4000


def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


ROW = b"\x00" + (bytes(range(256)) * (3 * SIDE // 256 + 1))[:3 * SIDE]
IDAT = chunk(b"IDAT", zlib.compress(ROW * SIDE, 9))


def png(nonce):
    ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"tEXt", b"Comment\x00" + nonce.encode()) + IDAT + chunk(b"IEND", b""))


def post(path, data, headers=None):
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    h = {"Content-Type": f"multipart/form-data; boundary={b}", **(headers or {})}
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def mem():
    with open(f"/proc/{PID}/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) // 1024, int(d["VmHWM"].split()[0]) // 1024


query = png("query")
codes = collections.Counter()
print(f"start: VmRSS {mem()[0]} MiB, VmHWM {mem()[1]} MiB")
for r in range(ROUNDS):
    jobs = [lambda: post("/api/search/image?limit=3", query)] * 8
    jobs += [lambda i=i: post("/api/images", png(f"{r}-{i}-{time.time()}"), {"X-Api-Key": KEY})
             for i in range(2)]
    threads = [threading.Thread(target=lambda j=j: codes.update([j()])) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss, hwm = mem()
    print(f"round {r}: VmRSS {rss} MiB, VmHWM {hwm} MiB", flush=True)
print("statuses:", dict(codes))
