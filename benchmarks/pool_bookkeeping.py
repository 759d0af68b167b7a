"""The Ray evaluator's bookkeeping per pass of its loop, against the pool's size: which calls may
still be sent (two per actor) and which running call has stalled. Before session 10 both scanned
every call in flight for every call (O(calls^2)); now each actor keeps its own calls in order.
The two loops are replicated here as they are written in workers/evaluator.py (no Ray: a pool of
hundreds of actors does not fit on a laptop), with 2 calls in flight per actor.

    python benchmarks/pool_bookkeeping.py [--actors 8,64,256,1024]
"""
from __future__ import annotations

import argparse
import time


class Slot:
    def __init__(self):
        self.calls, self.running_since = [], 0.0


def before(slots, flight, now, timeout):  # flight: ref -> (batch, slot, start time)
    for s in slots * 2:
        sum(x is s for _, x, _ in flight.values()) >= 2
    for ref, (batch, slot, t0) in list(flight.items()):
        if ref not in flight or t0 > min(t for _, s_, t in flight.values() if s_ is slot):
            continue
        now - t0 > timeout * len(batch)


def after(slots, flight, now, timeout):  # flight: ref -> (batch, slot); slot.calls in order
    for s in slots * 2:
        len(s.calls) >= 2
    for slot in [s for s in slots if s.calls]:
        now - slot.running_since > timeout * len(flight[slot.calls[0]][0])


def per_pass(fn, slots, flight, seconds=0.5) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(slots, flight, time.monotonic(), 1e9)
        n += 1
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", default="8,64,256,1024")
    args = ap.parse_args()
    print("| actors | calls in flight | before ms per pass | after ms per pass |")
    print("|---|---|---|---|")
    for a in (int(x) for x in args.actors.split(",")):
        slots = [Slot() for _ in range(a)]
        old, new = {}, {}
        for i, s in enumerate(slots):
            for j in range(2):
                ref = object()
                old[ref], new[ref] = ([1], s, float(i + j)), ([1], s)
                s.calls.append(ref)
        print(f"| {a} | {2 * a} | {per_pass(before, slots, old) * 1e3:.3f} | {per_pass(after, slots, new) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
