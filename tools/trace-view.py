#!/usr/bin/env python3
"""Read the decode-step timeline that `DSV4_TRACE=1 synthetic_bench ...` prints
(rows `trace<tag>,ctx,kernel,start,wait,end`, µs from the step's first kernel)
and show where the step's time went.

  tools/trace-view.py FILE                 per kernel name: launches, and the time
                                           from its wait returning to the next wait
                                           returning in step order (the step's time
                                           split among kernels; side branches that
                                           overlap the main chain take little)
  tools/trace-view.py FILE --layer N       layer N's kernels in order (a layer
                                           starts at its attention HC mixes,
                                           `mvks_f16`), with those gaps

`start` is when block 0 of a launch began (before its programmatic-launch wait),
`wait` when that wait returned (about when the kernel before it in its stream
finished), `end` when block 0 ended; `markN` rows are points inside a kernel.
"""
import sys
from collections import defaultdict


def read(path):
    rows = []
    for line in open(path):
        if not line.startswith("trace"):
            continue
        f = line.strip().split(",")
        rows.append((f[2], float(f[3]), float(f[4]), float(f[5])))
    return rows


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    rows = read(sys.argv[1])
    if not rows:
        print("no trace rows in", sys.argv[1])
        return 1
    kern = [r for r in rows if not r[0].startswith("mark")]
    order = sorted(kern, key=lambda r: r[2])
    gap = {}
    for a, b in zip(order, order[1:]):
        gap[id(a)] = b[2] - a[2]
    gap[id(order[-1])] = max(order[-1][3] - order[-1][2], 0.0)
    if "--layer" in sys.argv:
        want = int(sys.argv[sys.argv.index("--layer") + 1])
        layer, out = -1, []
        mixes = 0
        for r in order:
            if r[0] == "mvks_f16":
                mixes += 1
                if mixes % 2 == 1:
                    layer += 1
            if layer == want:
                out.append(r)
        print(f"{'kernel':24} {'start':>9} {'wait':>9} {'end':>9} {'to next':>8}")
        for r in out:
            print(f"{r[0]:24} {r[1]:9.2f} {r[2]:9.2f} {r[3]:9.2f} {gap[id(r)]:8.2f}")
        marks = [r for r in rows if r[0].startswith("mark") and out and out[0][2] <= r[2] <= out[-1][3]]
        for r in marks:
            print(f"  {r[0]:22} at {r[2]:9.2f}")
        return 0
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for r in order:
        tot[r[0]] += gap[id(r)]
        cnt[r[0]] += 1
    step = order[-1][3] - min(r[1] for r in kern)
    print(f"step {step:.1f} us, {len(order)} launches")
    print(f"{'kernel':24} {'launches':>8} {'us':>9} {'share':>6}")
    for k in sorted(tot, key=lambda k: -tot[k]):
        print(f"{k:24} {cnt[k]:8d} {tot[k]:9.1f} {100 * tot[k] / step:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
