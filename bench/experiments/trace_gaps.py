"""Where is the GPU idle, and what was the CPU doing meanwhile? (issue 5: the ~44 ms not yet located)

Reads a chrome trace written by torch.profiler (with_stack=True gives Python frames) and reports:
- compute idle: time when no kernel runs on any stream (copies on the copy engines do not count as busy),
  grouped by the Python stack that launched the kernel ending each gap. A kernel launched after its gap began
  means the CPU was late (launch-bound); one launched before means it waited on another stream or event.
- CPU self time by Python function and CPU op on each thread (what to cut when a step is launch-bound).

    python bench/experiments/trace_gaps.py trace.json [--min-gap-us 10] [--top 20]
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
CPU_CATS = {"cpu_op", "python_function", "user_annotation"}


class Nest:
    """Properly nested intervals of one thread: the chain of events enclosing a time, innermost first."""

    def __init__(self, events: list[dict]):
        self.ev = sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0)))
        self.starts = [e["ts"] for e in self.ev]
        self.parent = [-1] * len(self.ev)
        self.child_time = [0.0] * len(self.ev)
        stack: list[int] = []
        for i, e in enumerate(self.ev):
            start, end = e["ts"], e["ts"] + e.get("dur", 0)
            while stack and self._end(stack[-1]) <= start:
                stack.pop()
            if stack and self._end(stack[-1]) >= end:
                self.parent[i] = stack[-1]
                self.child_time[stack[-1]] += e.get("dur", 0)
            elif stack:  # overlaps its predecessor without nesting (async events): a root of its own
                stack = []
            stack.append(i)

    def _end(self, i: int) -> float:
        return self.ev[i]["ts"] + self.ev[i].get("dur", 0)

    def chain(self, t: float) -> list[dict]:
        """Events enclosing t, innermost first: an enclosing event is an ancestor of the last one to start."""
        i = bisect.bisect_right(self.starts, t) - 1
        out = []
        while i >= 0:
            if self._end(i) >= t:
                out.append(self.ev[i])
            i = self.parent[i]
        return out

    def self_times(self) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = defaultdict(float)
        for e, child in zip(self.ev, self.child_time):
            out[(e.get("cat", ""), e["name"])] += max(0.0, e.get("dur", 0) - child)
        return out


def short(e: dict) -> str:
    name = e["name"]
    if e.get("cat") == "python_function":
        # "path/to/file.py(123): func" -> "file.py:func"
        head, _, func = name.partition(": ")
        file = head.rsplit("/", 1)[-1].split("(")[0]
        return f"{file}:{func}" if func else name
    return name


def site(chain: list[dict], depth: int) -> str:
    """The innermost frames that are ours or a CPU op (torch internals skipped), innermost first."""
    frames = []
    for e in chain:
        if e.get("cat") == "python_function":
            n = e["name"]
            if (n.startswith("torch/") or "/torch/" in n) and "_inductor" not in n and "autograd/function" not in n:
                continue
            if "threading.py" in n or "<built-in" in n or "logging/" in n:
                continue
        elif e.get("cat") != "cpu_op":
            continue
        frames.append(short(e))
        if len(frames) >= depth:
            break
    return " <- ".join(frames) or "?"


def analyze(trace: dict, min_gap_us: float = 10.0, top: int = 20, depth: int = 5) -> str:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    window = (max(e["ts"] + e.get("dur", 0) for e in ops) - min(e["ts"] for e in ops)) if ops else float("inf")
    by_tid: dict = defaultdict(list)
    dropped = 0
    for e in events:
        if e.get("cat") in CPU_CATS:
            if e.get("dur", 0) > window:  # Python frames left open when the profiler stopped (seen on the H100)
                dropped += 1
                continue
            by_tid[(e["pid"], e["tid"])].append(e)
    nests = {k: Nest(v) for k, v in by_tid.items()}

    lines = [] if gpu else ["no GPU kernels in the trace"]
    if dropped:
        lines.append(f"({dropped} CPU events longer than the traced window of {window / 1e3:.1f} ms left out)")
    if gpu:
        lines += _gaps(gpu, launches, nests, min_gap_us, top, depth)
    lines.append("CPU self time by thread (top functions / ops):")
    roots = {tid: sum(e.get("dur", 0) for e, p in zip(n.ev, n.parent) if p < 0) for tid, n in nests.items()}
    for tid, nest in sorted(nests.items(), key=lambda kv: -roots[kv[0]]):
        if roots[tid] < 1e3:
            continue
        lines.append(f" thread {tid[1]}: {roots[tid] / 1e3:.1f} ms in traced code")
        st = nest.self_times()
        for (cat, name), us in sorted(st.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"   {us / 1e3:8.2f} ms  {cat[:6]:6s} {short({'cat': cat, 'name': name})[:160]}")
    return "\n".join(lines)


def _gaps(gpu, launches, nests, min_gap_us, top, depth) -> list[str]:
    lines = []
    t0, busy_end = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"]
    busy = 0.0
    gaps: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kinds: dict[str, float] = defaultdict(float)
    cur_start = t0
    for k in gpu:
        start, end = k["ts"], k["ts"] + k["dur"]
        if start > busy_end:
            busy += busy_end - cur_start
            gap = start - busy_end
            if gap >= min_gap_us:
                launch = launches.get(k.get("args", {}).get("correlation"))
                if launch is None:
                    key, kind = f"(no launch record) {k['name'][:60]}", "unknown"
                else:
                    nest = nests.get((launch["pid"], launch["tid"]))
                    chain = nest.chain(launch["ts"]) if nest else []
                    late = launch["ts"] > busy_end
                    kind = "cpu late" if late else "waited on a stream/event"
                    key = f"[{kind}] {site(chain, depth)}"
                    if late and nest:  # what that thread was running when the GPU ran dry
                        key += f"  || at gap start: {site(nest.chain(busy_end), 3)}"
                gaps[key][0] += gap
                gaps[key][1] += 1
                kinds[kind] += gap
            else:
                kinds["short (< min gap)"] += gap
            cur_start = start
        busy_end = max(busy_end, end)
    busy += busy_end - cur_start
    span = busy_end - t0
    idle = span - busy
    lines.append(f"GPU span {span / 1e3:.1f} ms: compute busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms "
                 f"({len(gpu)} kernels)")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:28s} {us / 1e3:8.2f} ms")
    lines.append(f"idle gaps >= {min_gap_us:g} us by the launch site of the kernel after the gap:")
    for key, (us, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / 1e3:8.2f} ms  x{n:5d}  {key[:300]}")

    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-gap-us", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--depth", type=int, default=5)
    args = ap.parse_args()
    with open(args.trace, encoding="utf-8") as f:
        trace = json.load(f)
    print(analyze(trace, args.min_gap_us, args.top, args.depth))


if __name__ == "__main__":
    main()
