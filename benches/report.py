#!/usr/bin/env python3
"""Combines the JSON lines of examples/bench_compare.rs (side "ours") and benches/pytorch_side.py
(side "pytorch") from all rounds of benches/compare.sh into one Markdown table.

Per operation and side: the median rate over all samples and its spread (min-max), the ratio
ours/PyTorch of the medians (> 1: we are faster; for caption latency the ratio is PyTorch's
latency over ours, so > 1 still means faster), and for our side the achieved FLOP/s as a share
of this machine's peak (see cpu_peak()).

Usage: report.py RESULTS.jsonl [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ORDER = [
    ("image_b1", "image encoding, batch 1"),
    ("image_b8", "image encoding, batch 8"),
    ("text_query", "text query encoding"),
    ("itm", "ITM, 35-token text vs stored image features"),
    ("caption", "caption latency, beam 3, max 20"),
]


def cpu_peak(cores: int | None = None):
    """Peak f32 FLOP/s of this machine from /proc/cpuinfo, with the formula in words.

    peak = cores x clock x FMA pipes (2) x f32 lanes x 2 (an FMA is two FLOPs), where the lanes
    are 16 for AVX-512 cores with full-width 512-bit FMA pipes, 8 for AVX2/FMA cores and for Zen 4
    (AMD family 0x19, which runs 512-bit instructions through its 256-bit pipes), and the clock is
    the one /proc/cpuinfo reports (`cpu MHz`; BLIPSEARCH_BENCH_CPU_GHZ overrides it, e.g. with a
    known all-core boost clock).
    """
    flags, mhz, family, vendor, model = set(), [], None, "", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "flags":
                flags = set(v.split())
            elif k == "cpu MHz":
                mhz.append(float(v))
            elif k == "cpu family":
                family = int(v)
            elif k == "vendor_id":
                vendor = v
            elif k == "model name":
                model = v
    cores = cores or os.cpu_count() or 1
    ghz = float(os.environ.get("BLIPSEARCH_BENCH_CPU_GHZ", 0)) or (max(mhz) / 1000 if mhz else 0.0)
    zen4 = vendor == "AuthenticAMD" and family == 0x19
    if "avx512f" in flags and not zen4:
        lanes, why = 16, "AVX-512 with 512-bit FMA pipes"
    elif "fma" in flags or "avx2" in flags:
        lanes, why = 8, "256-bit FMA" + (" (Zen 4 splits AVX-512 into 256-bit halves)" if zen4 else "")
    else:
        lanes, why = 4, "SSE"
    flop_per_cycle = 2 * lanes * 2
    peak = cores * ghz * 1e9 * flop_per_cycle
    desc = (f"{model}: {cores} cores x {ghz:.3f} GHz x 2 FMA pipes x {lanes} f32 lanes ({why}) x 2 FLOP/FMA"
            f" = {peak / 1e9:.0f} GFLOP/s")
    return peak, desc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--threads", type=int, default=None, help="threads both sides used (peak uses this many cores)")
    ap.add_argument("--other", default="pytorch", help="the side to compare with: pytorch, or baseline (compare.sh --baseline)")
    a = ap.parse_args()
    samples: dict[tuple[str, str], list[float]] = {}
    flops: dict[str, float] = {}
    units: dict[str, str] = {}
    items: dict[str, int] = {}
    memory: dict[str, float] = {}
    extras: dict[tuple[str, str], dict] = {}
    info: dict[str, dict] = {}
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            side = r["side"]
            if r["kind"] == "op":
                samples.setdefault((side, r["op"]), []).extend(r["seconds"])
                units[r["op"]] = r["unit"]
                items[r["op"]] = r["items"]
                extras[(side, r["op"])] = r.get("extra", {})
                if side == "ours" and r.get("flops"):
                    flops[r["op"]] = r["flops"]
            elif r["kind"] == "memory" and r.get("peak_rss_mib") is not None:
                memory[side] = max(memory.get(side, 0.0), r["peak_rss_mib"])
            elif r["kind"] == "info":
                info[side] = r
    threads = a.threads or info.get("ours", {}).get("threads") or os.cpu_count()
    peak, peak_desc = cpu_peak(min(threads, os.cpu_count() or threads))

    def rates(side, op):
        s = samples.get((side, op), [])
        if units[op].startswith("s/"):
            return s  # latency: seconds per item
        return [items[op] / x for x in s]

    def fmt(v):
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"

    out = []
    other = {"pytorch": "PyTorch"}.get(a.other, a.other)
    out.append(f"| operation | unit | ours median (min-max) | {other} median (min-max) | ours/{other} | our FLOP/s (share of peak) |")
    out.append("|---|---|---|---|---|---|")
    for op, label in ORDER:
        if op not in units:
            continue
        cells = []
        meds = {}
        for side in ("ours", a.other):
            r = rates(side, op)
            if not r:
                cells.append("-")
                continue
            meds[side] = statistics.median(r)
            cells.append(f"{fmt(meds[side])} ({fmt(min(r))}-{fmt(max(r))}), n={len(r)}")
        if len(meds) == 2:
            latency = units[op].startswith("s/")
            ratio = meds[a.other] / meds["ours"] if latency else meds["ours"] / meds[a.other]
            ratio_s = f"**{ratio:.2f}x**"
        else:
            ratio_s = "-"
        if op in flops and "ours" in meds:
            achieved = flops[op] * meds["ours"] / items[op]
            fl = f"{achieved / 1e9:.0f} GFLOP/s ({100 * achieved / peak:.0f}%)" if peak else "-"
        else:
            fl = "-"
        out.append(f"| {label} | {units[op]} | {cells[0]} | {cells[1]} | {ratio_s} | {fl} |")
    if memory:
        mo, mp = memory.get("ours"), memory.get(a.other)
        if mo and mp:
            # for memory, lower is better: the ratio is still ours/PyTorch
            out.append(f"| peak memory (both models loaded, whole process) | MiB, lower is better | {mo:.0f} | {mp:.0f} "
                       f"| {mo / mp:.2f}x | |")
    print("\n".join(out))
    print()
    print(f"Threads per side: {threads}. Machine peak: {peak_desc}.")
    for side in ("ours", a.other):
        c = extras.get((side, "caption"))
        if c:
            print(f"{side} caption: {c.get('tokens')} new tokens: {c.get('text')!r}")
    po, pp = extras.get(("ours", "itm"), {}).get("p_match"), extras.get((a.other, "itm"), {}).get("p_match")
    if po and pp:
        print(f"ITM p(match) max |ours - {other}| = {max(abs(x - y) for x, y in zip(po, pp)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
