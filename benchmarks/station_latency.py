"""Station speed: file complete -> verdict published on MQTT, against the bare scoring time of the same model on the
same images, measured side by side in one run.

A ``fewvision station run`` process (PatchCore on the ``texture`` backbone, 20 good textile images; an MQTT sink to
Debian's mosquitto on loopback and a CSV sink) watches a folder. Latency: ``--images`` textile images land one at a
time (temp name, then rename: the moment the file is complete), each after the previous verdict arrived; the time
from the rename to the MQTT message reaching a subscriber is compared with ``judge`` on that one image in this
process (decode, encode, score: the bare scoring time). Throughput: the same number of other images land at once;
the station's rate (first rename to last message) is compared with ``judge`` on all of them in one call (the
in-process batch path of ``anomaly predict``). Goals: the station adds at most 15 ms at p95 and keeps >= 0.95x the
batch rate.

Usage: .venv/bin/python benchmarks/station_latency.py [--images 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _report import percentile, table, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    import paho.mqtt.client as mqtt
    from station_helpers import Broker, station_process, wait_for, write_station

    from fewvision.io.datasets import textile_root
    from fewvision.modelfile import load, save_model
    from fewvision.tasks.anomaly import fit_anomaly
    from fewvision.tasks.verdicts import judge

    root = textile_root()
    nominal = sorted((root / "nominal").glob("*.jpg"))
    pool = nominal[20:] + sorted((root / "local").glob("*.jpg")) + sorted((root / "global").glob("*.jpg"))
    n = args.images
    latency_images, batch_images = pool[:n], pool[n:2 * n]
    work = Path(tempfile.mkdtemp(prefix="station-bench-"))
    try:
        model_path = save_model(work / "textile.fvm", fit_anomaly(nominal[:20], "patchcore", "texture",
                                                                   target_false_reject=0.1, use_cache=False))
        model = load(model_path)
        model.backbone()
        judge(model, [str(p) for p in latency_images[:8]], use_cache=False)  # warm up
        bare, batch_rates = [], []

        def measure_bare() -> None:  # before and after the station: this machine's speed drifts between minutes
            for p in latency_images[::2]:
                t = time.perf_counter()
                judge(model, [str(p)], use_cache=False)
                bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            judge(model, [str(p) for p in batch_images], use_cache=False)
            batch_rates.append(n / (time.perf_counter() - t))

        measure_bare()
        broker = Broker(work / "mosquitto")
        broker.start()
        topic = "bench/station/verdict"
        arrived: dict[str, float] = {}
        recorded: dict[str, float] = {}  # the station's own latency_ms: found complete -> recorded
        got = threading.Condition()

        def on_message(client, userdata, msg):
            m = json.loads(msg.payload)
            with got:
                arrived.setdefault(m["filename"], time.time())
                recorded.setdefault(m["filename"], m["latency_ms"] / 1000)
                got.notify_all()

        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
        sub.on_message = on_message
        sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        station_dir = work / "station"
        config = write_station(station_dir, model_path, [{"mqtt": {"url": broker.url, "topic": topic}},
                                                         {"csv": {"path": "verdicts.csv"}}])
        incoming = station_dir / "incoming"
        incoming.mkdir(parents=True)
        proc = station_process(config, threads=None)  # every core, as the bare scoring in this process
        try:
            wait_for(lambda: proc.poll() is None and (station_dir / "station.sqlite").exists(), 120, "the station")
            landed: dict[str, float] = {}

            def land(src: Path, name: str) -> None:
                tmp = incoming / f".{name}.tmp"
                shutil.copyfile(src, tmp)
                os.replace(tmp, incoming / name)
                landed[name] = time.time()

            for i, src in enumerate(latency_images[:8]):  # the station's first images warm it up too
                land(src, f"W{i:04d}_{src.name}")
            wait_for(lambda: len(arrived) >= 8, 120, "the warm-up verdicts")
            names = []
            for i, src in enumerate(latency_images):
                name = f"L{i:04d}_{src.name}"
                land(src, name)
                names.append(name)
                with got:
                    if not got.wait_for(lambda: name in arrived, timeout=60):
                        raise RuntimeError(f"no verdict for {name}")
            station_latency = [arrived[m] - landed[m] for m in names]
            station_recorded = [recorded[m] for m in names]
            names = [f"B{i:04d}_{src.name}" for i, src in enumerate(batch_images)]
            for name, src in zip(names, batch_images):
                tmp = incoming / f".{name}.tmp"
                shutil.copyfile(src, tmp)
            start = time.time()
            for name in names:
                os.replace(incoming / f".{name}.tmp", incoming / name)
            wait_for(lambda: all(m in arrived for m in names), 600, "the batch's verdicts")
            station_rate = n / (max(arrived[m] for m in names) - start)
        finally:
            proc.terminate()
            proc.wait(60)
            sub.loop_stop()
            broker.stop()
        measure_bare()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    batch_rate = sum(batch_rates) / len(batch_rates)

    ms = lambda v: f"{1000 * v:.1f}"  # noqa: E731
    added50 = percentile(station_latency, 0.5) - percentile(bare, 0.5)
    added95 = percentile(station_latency, 0.95) - percentile(bare, 0.95)
    rows = [["bare scoring (judge, one image)", ms(percentile(bare, 0.5)), ms(percentile(bare, 0.95)), ""],
            ["station: file found complete -> verdict recorded (its latency_ms)",
             ms(percentile(station_recorded, 0.5)), ms(percentile(station_recorded, 0.95)), ""],
            ["station: file complete -> MQTT message", ms(percentile(station_latency, 0.5)),
             ms(percentile(station_latency, 0.95)), ""],
            ["added by the station", ms(added50), ms(added95), "goal <= 15 ms at p95"]]
    md = ("## Station latency and throughput (`benchmarks/station_latency.py`)\n\n"
          f"{n} textile images landing one at a time in a station's folder (temp name, rename), each after the "
          "previous verdict, PatchCore on the `texture` backbone (20 good images); latency from the rename to the "
          "verdict reaching an MQTT subscriber (mosquitto on loopback, QoS 1; a CSV sink too), against `judge` on "
          "the same images in the benchmark's process. Then another "
          f"{n} images landing at once: the station's rate against `judge` on all of them in one call.\n\n"
          + table(["", "p50 ms", "p95 ms", ""], rows)
          + f"\n\nThroughput: station {station_rate:.1f} images/s, in-process batch {batch_rate:.1f} images/s "
          f"(mean of {batch_rates[0]:.1f} before and {batch_rates[1]:.1f} after the station): "
          f"{station_rate / batch_rate:.2f}x (goal >= 0.95x). The bare scoring times are of every other image, "
          "measured before and after the station.\n")
    print(md)
    write_section("station_latency", md)


if __name__ == "__main__":
    main()
