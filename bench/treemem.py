"""Runs a command and samples the memory of its whole process tree.

    python3 bench/treemem.py [--interval 0.1] -- COMMAND [ARG ...]

Every interval it sums, over the command and all its descendants, the
resident set size (RSS: shared pages such as the executable's counted in
every process) and the proportional set size (PSS: shared pages split
between the processes sharing them, the honest total), from /proc. Prints
one line after the command exits:

    peak_rss_mb=... peak_pss_mb=... peak_processes=... wall_s=... exit=...

and passes the command's exit status through.
"""
import os
import subprocess
import sys
import time


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tree(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def mem_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def main() -> int:
    args = sys.argv[1:]
    interval = 0.1
    if args[:1] == ["--interval"]:
        interval, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    start = time.time()
    proc = subprocess.Popen(args)
    peak_rss = peak_pss = peak_n = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss = pss = 0
        for p in pids:
            r, s = mem_kb(p)
            rss, pss = rss + r, pss + s
        peak_rss, peak_pss, peak_n = max(peak_rss, rss), max(peak_pss, pss), max(peak_n, len(pids))
        time.sleep(interval)
    wall = time.time() - start
    print(
        f"peak_rss_mb={peak_rss / 1024:.1f} peak_pss_mb={peak_pss / 1024:.1f} "
        f"peak_processes={peak_n} wall_s={wall:.2f} exit={proc.returncode}",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
