#!/usr/bin/env python3
"""Where a decode step's time goes, from a ferry trace (`--trace FILE`, Chrome trace JSON).

    bench/trace_steps.py TRACE.json [--skip N]

Steps start at each `step.prepare` span. For every step after the first N (default 1: the prompt),
prints the step's length and, per track, how long it was busy (the union of its spans) and its
spans' count: the GPU's compute (`gpu.compute`), the CPU's layers (`cpu.compute`), the copy engine
(`gpu.copy`, or `emulated.copy`), and the time neither the GPU nor the CPU computed (waits for copies,
hand-overs between them, the host's own work). A median row follows.
"""
import json
import statistics
import sys


def union_ms(spans, lo, hi):
    """Busy milliseconds of [start, end) spans clipped to [lo, hi)."""
    clipped = sorted((max(s, lo), min(e, hi)) for s, e in spans if e > lo and s < hi)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in clipped:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    skip = 1
    if "--skip" in args:
        i = args.index("--skip")
        skip = int(args[i + 1])
        del args[i:i + 2]
    with open(args[0]) as f:
        d = json.load(f)
    ev = d["traceEvents"] if isinstance(d, dict) else d
    names = {e["tid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = {}
    starts = []
    for e in ev:
        if e.get("ph") != "X":
            continue
        track = names.get(e["tid"], str(e["tid"]))
        spans.setdefault(track, []).append((e["ts"], e["ts"] + e["dur"]))
        if e["name"] == "step.prepare":
            starts.append(e["ts"])
    starts.sort()
    if len(starts) < skip + 2:
        print(f"{args[0]}: {len(starts)} steps; need at least {skip + 2} (one to skip, one whole)", file=sys.stderr)
        return 1
    copy = "gpu.copy" if "gpu.copy" in spans else "emulated.copy"
    cols = [("gpu.compute", "GPU compute"), ("cpu.compute", "CPU layers"), (copy, "copies")]
    print("| step | ms | " + " | ".join(f"{t} busy ms (spans)" for _, t in cols) + " | copies idle ms | neither computing ms |")
    print("|---" * (len(cols) + 4) + "|")
    rows = []
    for k in range(skip, len(starts) - 1):
        lo, hi = starts[k], starts[k + 1]
        row = {"ms": (hi - lo) / 1e3}
        cells = []
        for track, _ in cols:
            s = spans.get(track, [])
            busy = union_ms(s, lo, hi)
            n = sum(1 for a, b in s if a >= lo and a < hi)
            row[track] = busy
            cells.append(f"{busy:.1f} ({n})")
        row["idle"] = row["ms"] - row[copy]
        row["neither"] = row["ms"] - union_ms(spans.get("gpu.compute", []) + spans.get("cpu.compute", []), lo, hi)
        rows.append(row)
        print(f"| {k} | {row['ms']:.1f} | " + " | ".join(cells) + f" | {row['idle']:.1f} | {row['neither']:.1f} |")
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"| median | {med['ms']:.1f} | " + " | ".join(f"{med[t]:.1f}" for t, _ in cols) + f" | {med['idle']:.1f} | {med['neither']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
