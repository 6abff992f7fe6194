#!/usr/bin/env python3
"""Petal with the seed's PyTorch code as a Python learner, side by side with
the seed's own system (Flower 1.41 + PyTorch + a spawned process per step,
bench/seed/seed_system.py), on Fashion-MNIST, in one invocation.

    python3 bench/python_vs_seed.py PETAL TORCH_PYTHON [--configs 2,2,2,3 10,10,5,3] [--runs 3]

CONFIG is NBCLIENTS,NBMINCLIENTS,NBFITCLIENTS,NBROUNDS as run.sh takes it.
For each config the two systems run in turn (seed, Petal, seed, Petal, …)
and the script prints, per system: the median wall time of a whole run
(start to the server's exit), the final accuracy, the median per-step
overhead (a step's time seen by the client minus the time spent in the
learner's fit or evaluate: process start, imports, data, transfer), and
the ratio Petal / seed of the wall times. Then the idle memory of 1 and of
10 clients (every process with its children: RSS, PSS and anonymous
memory, from /proc) waiting for a server that never starts a round: the
seed runs a Python client per client, Petal one process for all of them. Writes bench/results/python_vs_seed.json.
"""
import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "bench/seed/seed_system.py"
LEARNER = f"python:{ROOT / 'examples/pytorch/cnn.py'}:make"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def env():
    e = dict(os.environ)
    for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]:
        e.pop(k, None)
    e["no_proxy"] = "127.0.0.1,localhost"
    return e


def steps(text, marker):
    """(call_ms, learner_ms) of every step line with `marker`."""
    out = []
    for m in re.finditer(marker + r" \S+.*?call_ms=([\d.]+) learner_ms=([\d.]+)", text):
        out.append((float(m.group(1)), float(m.group(2))))
    return out


def run_seed(py, cfg, logdir):
    n, m, f, r = cfg
    addr = f"127.0.0.1:{free_port()}"
    start = time.perf_counter()
    server = subprocess.Popen([py, SEED, "server", addr, str(m), str(f), str(r)], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    clients = [subprocess.Popen([py, SEED, "client", addr, str(i), str(n)], env=env(),
                                stdout=open(logdir / f"seed-client-{i}.log", "w"),
                                stderr=subprocess.STDOUT) for i in range(n)]
    out, _ = server.communicate(timeout=3600)
    wall = time.perf_counter() - start
    for c in clients:
        try:
            c.wait(timeout=60)
        except subprocess.TimeoutExpired:
            c.kill()
    text = "".join((logdir / f"seed-client-{i}.log").read_text() for i in range(n))
    acc = re.search(r"SEED-RESULT accuracy=([\d.]+)", out)
    return wall, float(acc.group(1)) if acc else None, steps(text, "SEED-STEP")


def run_petal(petal, py, cfg, logdir):
    n, m, f, r = cfg
    out = logdir / f"petal-run-{time.time_ns()}"
    e = env()
    e["RUST_LOG"] = "warn,petal_python=debug"
    start = time.perf_counter()
    p = subprocess.run([petal, "run", "--clients", str(n), "--min-clients", str(m),
                        "--fit-clients", str(f), "--rounds", str(r), "--learner", LEARNER,
                        "--python", py, "--out", str(out)],
                       env=e, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"petal run failed:\n{p.stderr[-3000:]}")
    h = json.loads((out / "history.json").read_text())
    return wall, h["rounds"][-1]["accuracy"], steps(p.stderr, "PETAL-STEP")


def tree(pid):
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                          text=True).stdout.split()
    out = [pid]
    for k in kids:
        out += tree(int(k))
    return out


def memory(pids):
    """RSS, PSS and anonymous memory (MB) summed over `pids`: PSS shares
    pages mapped by several processes; anonymous memory is what the
    processes really hold (file-backed pages such as libtorch's code can be
    dropped and re-read)."""
    keys = {"Rss:": 0, "Pss:": 1, "Anonymous:": 2}
    total = [0.0, 0.0, 0.0]
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                k = line.split()[0]
                if k in keys:
                    total[keys[k]] += int(line.split()[1]) / 1024
        except OSError:
            pass
    return {"rss": round(total[0], 1), "pss": round(total[1], 1), "anon": round(total[2], 1)}


def idle(cmd_server, cmd_clients):
    """Memory of idle clients (each process with its children), connected
    to a server waiting for more clients than there are."""
    server = subprocess.Popen(cmd_server, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(2.0)
    clients = [subprocess.Popen(c, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for c in cmd_clients]
    time.sleep(15.0)
    mem = memory([p for c in clients for p in tree(c.pid)])
    for p in clients + [server]:
        p.kill()
        p.wait()
    return mem


def idle_both(a, logdir, n):
    """Idle memory of n clients: the seed's n Python clients, and one Petal
    client process hosting n logical clients (`--clients n`)."""
    addr = f"127.0.0.1:{free_port()}"
    seed = idle([a.python, SEED, "server", addr, str(n + 1), str(n + 1), "1"],
                [[a.python, SEED, "client", addr, str(i), str(n)] for i in range(n)])
    port = free_port()
    petal = idle([a.petal, "server", "--address", f"127.0.0.1:{port}",
                  "--min-available-clients", str(n + 1), "--fit-clients", "1", "--out",
                  str(logdir / f"idle-{time.time_ns()}")],
                 [[a.petal, "client", "--server", f"127.0.0.1:{port}", "--learner", LEARNER,
                   "--python", a.python, "--clients", str(n), "--num-partitions", str(n)]])
    return {"seed": seed, "petal": petal}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("petal")
    ap.add_argument("python")
    ap.add_argument("--configs", nargs="+", default=["2,2,2,3", "10,10,5,3"])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"python_vs_seed-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    results = []
    print("| config | system | wall s (median) | final accuracy | step overhead ms (median) | Petal/seed |")
    print("|---|---|---|---|---|---|")
    for c in a.configs:
        cfg = tuple(int(x) for x in c.split(","))
        seed, petal = [], []
        for _ in range(a.runs):
            seed.append(run_seed(a.python, cfg, logdir))
            petal.append(run_petal(a.petal, a.python, cfg, logdir))
        row = {"config": c}
        for name, runs in (("seed", seed), ("petal", petal)):
            walls = [w for w, _, _ in runs]
            over = [call - learner for _, _, st in runs for call, learner in st]
            row[name] = {
                "wall_s": [round(w, 2) for w in walls],
                "median_wall_s": round(statistics.median(walls), 2),
                "accuracy": [acc for _, acc, _ in runs],
                "median_step_overhead_ms": round(statistics.median(over), 1) if over else None,
                "steps": len(over),
            }
        ratio = row["petal"]["median_wall_s"] / row["seed"]["median_wall_s"]
        row["ratio"] = round(ratio, 3)
        results.append(row)
        for name in ("seed", "petal"):
            r = row[name]
            print(f"| {c} | {name} | {r['median_wall_s']} | {r['accuracy'][-1]} | "
                  f"{r['median_step_overhead_ms']} | {'' if name == 'seed' else f'{ratio:.2f}'} |",
                  flush=True)
    idle_mb = {}
    print("| idle clients | system | RSS MB | PSS MB | anonymous MB |")
    print("|---|---|---|---|---|")
    for n in (1, 10):
        idle_mb[n] = idle_both(a, logdir, n)
        for name in ("seed", "petal"):
            m = idle_mb[n][name]
            print(f"| {n} | {name} | {m['rss']} | {m['pss']} | {m['anon']} |", flush=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {"cpu": cpu, "cores": os.cpu_count()}
    out = ROOT / "bench/results/python_vs_seed.json"
    out.write_text(json.dumps({"machine": machine, "results": results,
                               "idle_mb": idle_mb},
                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
