#!/usr/bin/env python3
"""Combines examples/hnsw_compare.rs (side "ours") and benches/hnswlib_side.py (side "hnswlib")
JSON lines into one Markdown table. Usage: report_vectors.py RESULTS.jsonl"""

from __future__ import annotations

import json
import math
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
    scan = search.pop(None, {}).get("ours_scan")
    o, h = build.get("ours", {}), build.get("hnswlib", {})
    n = o.get("n") or h.get("n")
    print(f"{n} seeded 256-d unit vectors, M={o.get('m')}, ef_construction={o.get('ef_construction')}, "
          f"build threads {o.get('threads')}, 200 queries, single-thread search")
    print()
    print("| | ours (flat search) | ours, hnsw_rs search | hnswlib | ours/hnswlib |")
    print("|---|---|---|---|---|")
    if o and h:
        print(f"| build time, s | {o['build_s']:.1f} | (same build) | {h['build_s']:.1f} "
              f"| {o['build_s'] / h['build_s']:.2f}x time |")
        print(f"| index memory (RSS growth), MiB | {o['index_mib']:.0f} | (same) | {h['index_mib']:.0f} "
              f"| {o['index_mib'] / max(h['index_mib'], 1e-9):.2f}x |")
    cell = lambda r: f"recall@10 {r['recall']:.4f}, {r['qps']:.0f} QPS" if r else "-"
    for ef in sorted(search):
        s = search[ef]
        so, sr, sh = s.get("ours"), s.get("ours_hnsw_rs"), s.get("hnswlib")
        ratio = f"{so['qps'] / sh['qps']:.2f}x QPS" if so and sh else "-"
        mark = " (exact scan)" if so and so.get("exact") else ""
        print(f"| ef = {ef} | {cell(so)}{mark} | {cell(sr)} | {cell(sh)} | {ratio} |")
    if scan:
        print(f"| exact scan (ours, `search_exact`) | {cell(scan)} | | | |")
    # QPS at equal recall: hnswlib's QPS interpolated (log-linear in QPS) at each of our recalls.
    hl = sorted((s["hnswlib"]["recall"], s["hnswlib"]["qps"]) for s in search.values() if "hnswlib" in s)
    if len(hl) >= 2:
        print()
        print("| our recall@10 | our QPS | hnswlib QPS at that recall (interpolated) | ours/hnswlib |")
        print("|---|---|---|---|")
        # Rows our index answered by the exact scan are the scan row again: listed once.
        ours = [search[ef].get("ours") for ef in sorted(search)] + [scan]
        ours = [so for so in ours if so and not so.get("exact")]
        if scan is None:
            ours += [so for so in (search[ef].get("ours") for ef in sorted(search))
                     if so and so.get("exact")][:1]
        for so in ours:
            r = so["recall"]
            for (r0, q0), (r1, q1) in zip(hl, hl[1:]):
                if r0 <= r <= r1:
                    t = (r - r0) / (r1 - r0) if r1 > r0 else 0.0
                    qh = math.exp(math.log(q0) + t * (math.log(q1) - math.log(q0)))
                    print(f"| {r:.4f} | {so['qps']:.0f} | {qh:.0f} | {so['qps'] / qh:.2f}x |")
                    break
            else:
                print(f"| {r:.4f} | {so['qps']:.0f} | outside hnswlib's measured range | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
