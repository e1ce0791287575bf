#!/usr/bin/env python3
"""hnswlib's side of `benches/compare.sh --vectors N`: builds an hnswlib index over the vectors
that examples/hnsw_compare.rs wrote (same M and ef_construction as our defaults, same thread
count for the build), then measures recall@10 against the same exact top-10 and single-thread
QPS at the same ef values (best of three passes per ef). Prints JSON lines (side "hnswlib")."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import hnswlib
import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="directory written by hnsw_compare --write")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ef", help="comma-separated search ef values (default: those in meta.json)")
    a = ap.parse_args()
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    n, dim, k = meta["n"], meta["dim"], meta["k"]
    data = np.fromfile(os.path.join(a.data, "vectors.f32"), dtype="<f4").reshape(n, dim)
    qs = np.fromfile(os.path.join(a.data, "queries.f32"), dtype="<f4").reshape(-1, dim)
    truth = np.fromfile(os.path.join(a.data, "truth.u32"), dtype="<u4").reshape(-1, k)
    before = rss_mib()
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=meta["m"], ef_construction=meta["ef_construction"], random_seed=100)
    t = time.perf_counter()
    index.add_items(data, np.arange(n), num_threads=a.threads)
    build_s = time.perf_counter() - t
    index_mib = rss_mib() - before
    print(json.dumps({"side": "hnswlib", "kind": "build", "n": n, "dim": dim, "m": meta["m"],
                      "ef_construction": meta["ef_construction"], "build_s": build_s, "threads": a.threads,
                      "index_mib": index_mib, "version": getattr(hnswlib, "__version__", "0.8.0")}), flush=True)
    efs = [int(e) for e in a.ef.split(",")] if a.ef else meta["ef"]
    for ef in efs:
        index.set_ef(ef)
        secs = float("inf")
        for _ in range(3):  # best of three passes, as examples/hnsw_compare.rs does
            t = time.perf_counter()
            labels, _ = index.knn_query(qs, k=k, num_threads=1)
            secs = min(secs, time.perf_counter() - t)
        hits = sum(len(set(labels[i].tolist()) & set(truth[i].tolist())) for i in range(len(qs)))
        print(json.dumps({"side": "hnswlib", "kind": "search", "ef": ef, "recall": hits / (k * len(qs)),
                          "qps": len(qs) / secs}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
