"""Service replicas: predictions per second with two ``fewvision serve`` processes on one PostgreSQL database against
one, side by side on this machine.

Each configuration gets its own database and data folder and the same anomaly project (PatchCore on the ``texture``
backbone, 20 good textile images); ``--clients`` threads then post ``--images`` textile images the service has not
seen (one per request, so every prediction decodes, encodes, scores and draws a heat map), spread round-robin over the
replicas as a proxy would. Each replica has its one inference thread and ``--threads`` = cores / replicas. Goal:
>= 1.7x with 2 replicas on 2 cores.

Usage: .venv/bin/python benchmarks/service_replicas.py [--images 240] [--clients 4,8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _report import percentile, table, write_section  # noqa: E402


def run(n_replicas: int, images: list[Path], clients: int, fit_images: list[Path]) -> dict:
    import httpx
    from service_helpers import Server, fresh_postgres_database, postgres_server_url

    db = fresh_postgres_database(postgres_server_url())
    data = Path(tempfile.mkdtemp(prefix=f"replicas-{n_replicas}-"))
    # two replicas on 2 cores: one thread each (two pools of 2 OpenMP threads would wait on each other)
    extra = ["--threads", str(max(1, (os.cpu_count() or 1) // n_replicas))]
    servers = [Server(data, db, extra) for _ in range(n_replicas)]
    token = servers[0].token("--name", "bench")
    h = {"Authorization": f"Bearer {token}"}
    for s in servers:
        s.start()
    try:
        url = servers[0].url
        p = httpx.post(f"{url}/v1/projects", json={"name": "bench", "task": "anomaly", "backbone": "texture"},
                       headers=h).json()
        for f in fit_images:
            httpx.post(f"{url}/v1/projects/{p['id']}/exemplars", files={"file": (f.name, f.read_bytes())},
                       data={"label": "good"}, headers=h, timeout=60)
        job = httpx.post(f"{url}/v1/projects/{p['id']}/fit", headers=h).json()
        while httpx.get(f"{url}/v1/jobs/{job['job_id']}", headers=h).json()["state"] not in ("done", "failed"):
            time.sleep(0.2)
        payloads = [(f.name, f.read_bytes()) for f in images]
        latencies, lock, next_i = [], threading.Lock(), [0]

        def client():
            with httpx.Client(timeout=120, headers=h) as c:
                while True:
                    with lock:
                        i = next_i[0]
                        next_i[0] += 1
                    if i >= len(payloads):
                        return
                    target = servers[i % n_replicas].url  # round robin, as a proxy would
                    t = time.perf_counter()
                    r = c.post(f"{target}/v1/projects/{p['id']}/predict", files={"file": payloads[i]})
                    assert r.status_code == 200, r.text
                    with lock:
                        latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return {"per_s": len(payloads) / wall, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)}
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--clients", default="4,8", help="concurrent clients, one run each")
    args = parser.parse_args()
    from fewvision.io.datasets import textile_root

    root = textile_root()
    nominal = sorted((root / "nominal").glob("*.jpg"))
    pool = nominal[200:] + sorted((root / "local").glob("*.jpg")) + sorted((root / "global").glob("*.jpg"))
    rows, ratios = [], []
    for k, clients in enumerate(int(c) for c in args.clients.split(",")):
        part = pool[2 * k * args.images :]
        one = run(1, part[: args.images], clients, nominal[:20])
        two = run(2, part[args.images : 2 * args.images], clients, nominal[:20])
        ratios.append(two["per_s"] / one["per_s"])
        rows += [[clients, n, f"{r['per_s']:.1f}", f"{1000 * r['p50']:.0f}", f"{1000 * r['p95']:.0f}",
                  f"{ratios[-1]:.2f}x" if n == "2" else ""] for n, r in (("1", one), ("2", two))]
    md = ("## Service replicas on PostgreSQL (`benchmarks/service_replicas.py`)\n\n"
          f"Predictions per second of one image each, {args.images} unseen textile images per run, anomaly project "
          "(PatchCore, `texture` backbone), one PostgreSQL database and one data folder per run, requests spread "
          "round-robin over the replicas, `--threads` = cores / replicas (`benchmarks/service_replicas.py`). The "
          "clients, the database and the replicas share the 2 cores.\n\n"
          + table(["clients", "replicas", "predictions/s", "p50 ms", "p95 ms", "2 against 1"], rows)
          + f"\n\n2 replicas against 1: {', '.join(f'{r:.2f}x' for r in ratios)} (goal >= 1.7x).\n")
    print(md)
    write_section("service_replicas", md)


if __name__ == "__main__":
    main()
