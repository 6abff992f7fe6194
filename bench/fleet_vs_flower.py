"""Petal nodes vs Flower's Python SuperNodes under one Flower SuperLink.

    python3 bench/fleet_vs_flower.py PETAL FLWR_BIN OUT_DIR [--n 1,10] [--rounds 6]

For each N and each kind of node (`flower`: Flower's `flower-supernode`;
`petal`: a `petal node` process per node; `petal-shared`: one `petal node
--nodes N` process; `petal-subprocess`: `petal node --isolation
subprocess`, the same as `petal` with no-op training, which needs no
worker), starts
a fresh SuperLink (plain HTTP, 127.0.0.1), N nodes, waits until all are
online, and runs the FedAvg ServerApp of examples/flower-app for
ROUNDS rounds with no-op training on every node (Flower: a NumPy ClientApp
that scales the arrays; Petal: `--device noop`). Measured on the node
process trees only (the SuperLink and ServerApp are the same for all):

- idle memory once all nodes are online (RSS and PSS, from /proc),
- peak memory during the run (sampled every 0.2 s),
- CPU seconds the nodes used during the run (user + system, including
  finished children), and those of the SuperLink with the ServerApp,
- the median wall time of rounds 2..ROUNDS as the ServerApp sees it
  (round 1 includes waiting for the nodes).

Prints a Markdown table and writes OUT_DIR/fleet_vs_flower.json (or --name).
"""
import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from treemem import mem_kb, tree  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "examples/flower-app"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(flwr_bin: Path, home: Path) -> dict:
    e = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    e["PATH"] = f"{flwr_bin}:{e.get('PATH', '')}"
    e["FLWR_HOME"] = str(home)
    e["RUST_LOG"] = "warn"
    return e


def cpu_s(pids: list[int]) -> float:
    """User + system time of live processes and their reaped children."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / TICK


def memory(roots: list[int]) -> tuple[float, float, list[int]]:
    pids = [p for r in roots for p in tree(r)]
    rss = pss = 0
    for p in pids:
        r, s = mem_kb(p)
        rss, pss = rss + r, pss + s
    return rss / 1024, pss / 1024, pids


def wait_online(flwr: Path, e: dict, n: int, limit: float = 180) -> None:
    end = time.time() + limit
    while time.time() < end:
        out = subprocess.run(
            [flwr, "supernode", "list", "--format", "json"],
            env=e, capture_output=True, text=True,
        )
        try:
            nodes = json.loads(out.stdout)["nodes"]
        except (ValueError, KeyError):
            nodes = []
        if sum(1 for x in nodes if x["status"] == "online") >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{n} nodes did not come online")


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def measure(kind: str, n: int, rounds: int, petal: Path, flwr_bin: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        home.mkdir()
        port = free_port()
        addr = f"127.0.0.1:{port}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "{addr}"\ninsecure = true\n'
        )
        e = env(flwr_bin, home)
        log = open(tmp / "log.txt", "w")
        spawn = lambda cmd: subprocess.Popen(  # noqa: E731
            cmd, env=e, cwd=tmp, stdout=log, stderr=log, start_new_session=True
        )
        superlink = spawn([
            flwr_bin / "flower-superlink", "--insecure",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port),
        ])
        nodes = []
        try:
            for i in range(n):
                if kind == "flower":
                    cmd = [flwr_bin / "flower-supernode", "--insecure",
                           "--superlink", addr, "--port", str(free_port())]
                elif kind == "petal-shared":
                    if i > 0:
                        continue
                    cmd = [petal, "node", "--insecure", "--superlink", addr,
                           "--device", "noop", "--dataset", "synthetic",
                           "--nodes", str(n), "--num-partitions", str(n)]
                else:
                    isolation = "subprocess" if kind.endswith("subprocess") else "none"
                    cmd = [petal, "node", "--insecure", "--superlink", addr,
                           "--device", "noop", "--dataset", "synthetic",
                           "--partition-id", str(i), "--num-partitions", str(n),
                           "--isolation", isolation]
                nodes.append(spawn(cmd))
            roots = [p.pid for p in nodes]
            wait_online(flwr_bin / "flwr", e, n)
            # Settle (Flower's SuperNode starts its SuperExec after joining).
            idle = []
            for _ in range(10):
                idle.append(memory(roots)[:2])
                time.sleep(0.5)
            idle_rss, idle_pss = idle[-1]
            cpu0 = cpu1 = cpu_s(memory(roots)[2])
            link0 = cpu_s(tree(superlink.pid))

            out = tmp / "run.txt"
            with open(out, "w") as f:
                run = subprocess.Popen(
                    [flwr_bin / "flwr", "run", str(APP), "local", "--stream",
                     "--run-config", f"num-server-rounds={rounds} min-nodes={n}"],
                    env=e, cwd=tmp, stdout=f, stderr=subprocess.STDOUT,
                )
            peak_rss = peak_pss = 0.0
            started = time.time()
            while run.poll() is None:
                rss, pss, pids = memory(roots)
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                cpu1 = cpu_s(pids)
                time.sleep(0.2)
                if time.time() - started > 1800:
                    run.kill()
            lines = out.read_text().splitlines()
            cpu1 = max(cpu1, cpu_s(memory(roots)[2]))
            link_cpu = cpu_s(tree(superlink.pid)) - link0
            round_s = {}
            for line in lines:
                if "PETAL-ROUND" in line:
                    r, s = line.split("PETAL-ROUND", 1)[1].split()[:2]
                    round_s[int(r)] = float(s)
            ok = "PETAL-DONE" in "\n".join(lines) and len(round_s) == rounds
            if not ok:
                sys.stderr.write("\n".join(lines[-40:]) + "\n")
            steady = [round_s[r] for r in sorted(round_s) if r > 1]
            return {
                "kind": kind, "n": n, "rounds": rounds, "ok": ok,
                "idle_rss_mb": round(idle_rss, 1), "idle_pss_mb": round(idle_pss, 1),
                "peak_rss_mb": round(peak_rss, 1), "peak_pss_mb": round(peak_pss, 1),
                "node_cpu_s": round(cpu1 - cpu0, 2),
                "superlink_cpu_s": round(link_cpu, 2),
                "round_s": round(statistics.median(steady), 3) if steady else None,
                "round_times": [round_s[r] for r in sorted(round_s)],
            }
        finally:
            for p in nodes:
                stop(p)
            stop(superlink)
            log.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("petal", type=Path)
    ap.add_argument("flwr_bin", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", default="1,10")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--kinds", default="flower,petal,petal-shared")
    ap.add_argument("--name", default="fleet_vs_flower", help="OUT_DIR/NAME.json")
    a = ap.parse_args()
    results = []
    print("| nodes | node | idle RSS MB | idle PSS MB | peak PSS MB | node CPU s "
          "| SuperLink CPU s | round s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in a.n.split(",")]:
        for kind in a.kinds.split(","):
            r = measure(kind, n, a.rounds, a.petal.resolve(), a.flwr_bin.resolve())
            results.append(r)
            flag = "" if r["ok"] else " (FAILED)"
            print(f"| {n} | {kind}{flag} | {r['idle_rss_mb']} | {r['idle_pss_mb']} | "
                  f"{r['peak_pss_mb']} | {r['node_cpu_s']} | {r['superlink_cpu_s']} | "
                  f"{r['round_s']} |", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    (a.out / f"{a.name}.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=1) + "\n"
    )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
