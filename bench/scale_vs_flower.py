"""Petal and Flower side by side with N no-op clients on this machine:
total memory (server + every client process) and wall time per round, for
each N; the largest N each completes; a plot. Run by bench/scale_vs_flower.sh.

    scale_vs_flower.py PETAL FLOWER_PYTHON OUT_DIR [--n 2,50,200,1000] [--rounds 5]

Every client of both systems trains and evaluates every round and does no
work (returns the model it receives: the seed CNN's 62,006 parameters), so
what is measured is the framework. Petal runs its clients as separate
processes (as Flower's) and as 100 clients per process. Flower 1.41 runs
its legacy gRPC server (`start_server`, FedAvg) and one Python process per
NumPyClient, for the N whose estimated memory fits the budget.

Round time: the median over rounds 2..R (round 1 includes the joins).
Memory: the peak, over the run, of the sum over all its processes of RSS
(shared pages counted in each process) and of PSS (shared pages divided
among the processes sharing them), sampled from /proc every 0.02 s (slower with many processes: each sample reads every process).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from treemem import mem_kb, tree  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FLOWER_MB_PER_CLIENT = 150  # measured: about 130 MB RSS per NumPy client


def sample(roots, stop, interval=0.02):
    """Peak RSS and PSS (MB) of the process trees of `roots` until `stop()`."""
    peak_rss = peak_pss = 0
    while not stop():
        rss = pss = 0
        for r in roots:
            for p in tree(r):
                a, b = mem_kb(p)
                rss, pss = rss + a, pss + b
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    return peak_rss / 1024, peak_pss / 1024


def petal(bin_path, n, rounds, per_process, tmp):
    out = os.path.join(tmp, f"petal-{n}-{per_process}")
    cmd = [
        bin_path, "run", "--device", "noop", "--clients", str(n), "--min-clients", str(n),
        "--fit-clients", str(n), "--rounds", str(rounds), "--fraction-evaluate", "1",
        "--clients-per-process", str(per_process), "--out", out,
    ]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss, pss = sample([proc.pid], lambda: proc.poll() is not None)
    wall = time.time() - start
    if proc.returncode != 0:
        return None
    with open(os.path.join(out, "history.json")) as f:
        rounds_s = [r["round_seconds"] for r in json.load(f)["rounds"]]
    return {"rss_mb": rss, "pss_mb": pss, "round_ms": 1000 * statistics.median(rounds_s[1:]), "wall_s": wall}


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def flower(python, n, rounds, tmp):
    addr = f"127.0.0.1:{free_port()}"
    out = os.path.join(tmp, f"flower-{n}.json")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    script = os.path.join(HERE, "flower_noop.py")
    start = time.time()
    server = subprocess.Popen(
        [python, script, "server", addr, str(n), str(rounds), out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    time.sleep(2.0)  # let the server bind before clients connect (they retry anyway)
    clients = [
        subprocess.Popen([python, script, "client", addr], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
        for _ in range(n)
    ]
    deadline = time.time() + 1800
    rss, pss = sample([server.pid] + [c.pid for c in clients],
                      lambda: server.poll() is not None or time.time() > deadline)
    wall = time.time() - start
    for c in clients:
        try:
            c.wait(timeout=30)
        except subprocess.TimeoutExpired:
            c.kill()
    if server.returncode != 0 or not os.path.exists(out):
        server.kill()
        return None
    with open(out) as f:
        t = json.load(f)
    marks = t["round_starts"] + [t["end"]]
    rounds_s = [b - a for a, b in zip(marks, marks[1:])]
    return {"rss_mb": rss, "pss_mb": pss, "round_ms": 1000 * statistics.median(rounds_s[1:]), "wall_s": wall}


def svg_plot(rows, path):
    """Memory and round time against N, log-log, one line per system."""
    series = [("petal_1", "Petal, a process per client", "#2a7"),
              ("petal_100", "Petal, 100 clients per process", "#27a"),
              ("flower", "Flower 1.41, a process per client", "#c52")]
    panels = [("rss_mb", "total RSS (MB)"), ("round_ms", "time per no-op round (ms)")]
    import math

    w, h, pad = 460, 320, 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h + 60}" font-family="sans-serif" font-size="12">']
    ns = sorted({r["n"] for r in rows})
    for pi, (key, title) in enumerate(panels):
        ox = pi * w
        vals = [r[s][key] for r in rows for s, _, _ in series if r.get(s)]
        lo, hi = math.log10(min(vals) / 1.5), math.log10(max(vals) * 1.5)
        xlo, xhi = math.log10(min(ns) / 1.3), math.log10(max(ns) * 1.3)

        def X(n):
            return ox + pad + (math.log10(n) - xlo) / (xhi - xlo) * (w - 2 * pad)

        def Y(v):
            return h - pad + 20 - (math.log10(v) - lo) / (hi - lo) * (h - 2 * pad)

        parts.append(f'<text x="{ox + w / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>')
        parts.append(f'<line x1="{ox + pad}" y1="{h - pad + 20}" x2="{ox + w - pad}" y2="{h - pad + 20}" stroke="#000"/>')
        parts.append(f'<line x1="{ox + pad}" y1="{pad - 20}" x2="{ox + pad}" y2="{h - pad + 20}" stroke="#000"/>')
        for n in ns:
            parts.append(f'<text x="{X(n)}" y="{h - pad + 36}" text-anchor="middle">{n}</text>')
        for e in range(math.floor(lo), math.ceil(hi) + 1):
            if lo <= e <= hi:
                parts.append(f'<text x="{ox + pad - 6}" y="{Y(10 ** e) + 4}" text-anchor="end">{10 ** e:g}</text>')
                parts.append(f'<line x1="{ox + pad}" y1="{Y(10 ** e)}" x2="{ox + w - pad}" y2="{Y(10 ** e)}" stroke="#ddd"/>')
        parts.append(f'<text x="{ox + w / 2}" y="{h - pad + 52}" text-anchor="middle">clients N</text>')
        for s, label, color in series:
            pts = [(X(r["n"]), Y(r[s][key])) for r in rows if r.get(s)]
            if pts:
                parts.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                             % (color, " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
                for x, y in pts:
                    parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
    for i, (_, label, color) in enumerate(series):
        parts.append(f'<rect x="{80 + i * 290}" y="{h + 40}" width="12" height="12" fill="{color}"/>')
        parts.append(f'<text x="{96 + i * 290}" y="{h + 50}">{label}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("petal")
    ap.add_argument("python")
    ap.add_argument("out")
    ap.add_argument("--n", default="2,50,200,1000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flower-budget-mb", type=int, default=None,
                    help="run Flower only when N * 150 MB fits (default: 60%% of RAM)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with open("/proc/meminfo") as f:
        total_mb = int(f.readline().split()[1]) / 1024
    budget = a.flower_budget_mb or int(0.6 * total_mb)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in a.n.split(",")]:
            row = {"n": n}
            row["petal_1"] = petal(a.petal, n, a.rounds, 1, tmp)
            row["petal_100"] = petal(a.petal, n, a.rounds, min(n, 100), tmp)
            row["flower"] = flower(a.python, n, a.rounds, tmp) if n * FLOWER_MB_PER_CLIENT <= budget else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, "scale_vs_flower.json"), "w") as f:
        json.dump(rows, f, indent=1)
    svg_plot(rows, os.path.join(a.out, "scale_vs_flower.svg"))

    def cell(r, key, fmt):
        return fmt.format(r[key]) if r else "–"

    print("\n| N | Petal (process per client) RSS / PSS MB | round ms | Petal (100 per process) RSS / PSS MB | round ms "
          "| Flower RSS / PSS MB | round ms | Flower / Petal round time | Flower / Petal RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p1, pk, fl = r["petal_1"], r["petal_100"], r["flower"]
        mem = lambda x: f"{x['rss_mb']:.0f} / {x['pss_mb']:.0f}" if x else "–"  # noqa: E731
        ratio_t = f"{fl['round_ms'] / p1['round_ms']:.1f}×" if fl and p1 else "–"
        ratio_m = f"{fl['rss_mb'] / p1['rss_mb']:.1f}×" if fl and p1 else "–"
        print(f"| {r['n']} | {mem(p1)} | {cell(p1, 'round_ms', '{:.1f}')} | {mem(pk)} | {cell(pk, 'round_ms', '{:.1f}')} "
              f"| {mem(fl)} | {cell(fl, 'round_ms', '{:.1f}')} | {ratio_t} | {ratio_m} |")
    done = lambda k: max([r["n"] for r in rows if r.get(k)], default=0)  # noqa: E731
    print(f"\nlargest N completed: Petal (process per client) {done('petal_1')}, "
          f"Petal (100 per process) {done('petal_100')}, Flower {done('flower')} "
          f"(Flower is run only while N × {FLOWER_MB_PER_CLIENT} MB fits in {budget} MB)")


if __name__ == "__main__":
    main()
