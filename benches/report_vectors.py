#!/usr/bin/env python3
"""Combines examples/hnsw_compare.rs (side "ours") and benches/hnswlib_side.py (side "hnswlib")
JSON lines into one Markdown table. Usage: report_vectors.py RESULTS.jsonl"""

from __future__ import annotations

import json
import sys


def main() -> int:
    build, search = {}, {}
    for line in open(sys.argv[1]):
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r["kind"] == "build":
            build[r["side"]] = r
        elif r["kind"] == "search":
            search.setdefault(r["ef"], {})[r["side"]] = r
    o, h = build.get("ours", {}), build.get("hnswlib", {})
    n = o.get("n") or h.get("n")
    print(f"{n} seeded 256-d unit vectors, M={o.get('m')}, ef_construction={o.get('ef_construction')}, "
          f"build threads {o.get('threads')}, 200 queries, single-thread search")
    print()
    print("| | ours (hnsw_rs) | hnswlib | ours/hnswlib |")
    print("|---|---|---|---|")
    if o and h:
        print(f"| build time, s | {o['build_s']:.1f} | {h['build_s']:.1f} | {o['build_s'] / h['build_s']:.2f}x time |")
        print(f"| index memory (RSS growth), MiB | {o['index_mib']:.0f} | {h['index_mib']:.0f} "
              f"| {o['index_mib'] / max(h['index_mib'], 1e-9):.2f}x |")
    for ef in sorted(search):
        s = search[ef]
        so, sh = s.get("ours"), s.get("hnswlib")
        cell = lambda r: f"recall@10 {r['recall']:.4f}, {r['qps']:.0f} QPS" if r else "-"
        ratio = f"{so['qps'] / sh['qps']:.2f}x QPS" if so and sh else "-"
        print(f"| ef = {ef} | {cell(so)} | {cell(sh)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
