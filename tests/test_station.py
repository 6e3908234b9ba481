"""The line station against real servers on loopback: Mosquitto, an asyncua client, an HTTP receiver, real files.

Model: PatchCore on the weight-free texture backbone, fitted on 20 good textile images (conformal-clip-data).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from station_helpers import (
    Broker,
    Subscriber,
    WebhookReceiver,
    land,
    passwords,
    running,
    signed,
    station_process,
    store_rows,
    tls_files,
    wait_for,
    write_station,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def textile_images(textile_root):
    return sorted((textile_root / "nominal").glob("*.jpg")), sorted((textile_root / "local").glob("*.jpg"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, textile_images):
    from fewvision.modelfile import save_model
    from fewvision.tasks.anomaly import fit_anomaly

    good, _ = textile_images
    model = fit_anomaly(good[:20], "patchcore", "texture", target_false_reject=0.1, use_cache=False)
    return save_model(tmp_path_factory.mktemp("station-model") / "textile.fvm", model)


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def age_outbox(station_dir: Path, when: str, where: str = "1 = 1") -> None:
    import sqlite3

    conn = sqlite3.connect(station_dir / "station.sqlite")
    with conn:
        conn.execute(f"update outbox set created_at = ? where {where}", (when,))
    conn.close()


def stream(textile_images, n: int) -> list[Path]:
    """``n`` images: good ones with every fifth a defect (names stay unique: P0000_..., P0001_...)."""
    good, bad = textile_images
    return [(bad[i // 5 % len(bad)] if i % 5 == 4 else good[20 + i % (len(good) - 20)]) for i in range(n)]


def quick_retry(sink: dict, initial: float = 0.05, most: float = 0.5) -> dict:
    kind = next(iter(sink))
    return {kind: {**sink[kind], "retry": {"initial_s": initial, "max_s": most}}}


# --- configuration ------------------------------------------------------------------------------------------------
def test_a_bad_station_file_is_one_line_naming_the_key(tmp_path, model_file, monkeypatch, capsys):
    from cli_helpers import run_cli

    from fewvision.station.config import ConfigError, load_config

    cases = {
        "name": ({"name": "line 3/cam"}, "name: expected letters"),
        "sink kind": ({"sinks": [{"kafka": {"url": "x"}}]}, "sinks[0]: unknown sink 'kafka'"),
        "mqtt url": ({"sinks": [{"mqtt": {"url": "http://broker", "topic": "t"}}]}, "sinks[0].mqtt: url: expected"),
        "mqtt topic": ({"sinks": [{"mqtt": {"topic": "plant/#"}}]}, "topic: expected a topic name without wildcards"),
        "webhook": ({"sinks": [{"webhook": {"url": "mes.local"}}]}, "sinks[0].webhook: url: expected an http"),
        "two csv": ({"sinks": [{"csv": {"path": "a.csv"}}, {"csv": {"path": "b.csv"}}]}, "two sinks are named 'csv'"),
        "after": ({"source": {"after": {"good": "ok"}}}, "source.after.good: unknown key"),
        "regex": ({"source": {"part_id": "(unclosed"}}, "source.part_id: not a regular expression"),
        "batch": ({"source": {"batch": 0}}, "source.batch: expected a number >= 1"),
        "model": ({"model": "missing.fvm"}, "model: no such file"),
    }
    for what, (extra, message) in cases.items():
        path = write_station(tmp_path / what.replace(" ", "-"), model_file, extra.pop("sinks", []), **extra)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert message in str(err.value), what
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    code, out, err = run_cli(monkeypatch, capsys, "station", "run", path)
    assert code == 2 and err.count("\n") == 1 and "model: no such file" in err


# --- the stream -----------------------------------------------------------------------------------------------------
def test_the_csv_sink_writes_every_column_to_a_new_file_and_an_old_files_own_to_an_old_file(tmp_path):
    """A file begun by an earlier release (13 columns, no region columns) gets rows that line up with its header; a
    new file gets the region columns, regions as JSON."""
    import csv

    from fewvision.station.sinks.csv_file import COLUMNS, CsvSink

    old_header = COLUMNS[:13]
    (tmp_path / "old.csv").write_text(",".join(old_header) + "\r\n" + ",".join(["x"] * 13) + "\r\n")
    message = {"kind": "verdict", "id": "v1", "verdict": "ng", "score": 2.5, "x": 10, "y": 20, "n_regions": 1,
               "regions": [{"x": 5, "y": 6, "width": 7, "height": 8, "area_px": 56, "area_pct": 0.1, "peak": 3.0}]}
    for name in ("old.csv", "new.csv"):
        sink = CsvSink("csv", {"path": tmp_path / name}, "s", {})
        sink.open()
        sink.send(message)
        sink.close()
    with open(tmp_path / "old.csv", newline="") as fh:
        old = list(csv.reader(fh))
    assert old[0] == old_header and [len(r) for r in old] == [13, 13, 13] and old[2][0] == "v1"
    with open(tmp_path / "new.csv", newline="") as fh:
        new = list(csv.DictReader(fh))
    assert list(new[0]) == COLUMNS and (new[0]["verdict"], new[0]["x"], new[0]["n_regions"]) == ("ng", "10", "1")
    assert json.loads(new[0]["regions"]) == message["regions"]


def test_300_images_through_a_broker_outage_arrive_once_each_in_order(tmp_path, model_file, broker, textile_images):
    """The broker stops for 10 s in the middle of the stream: every verdict reaches the subscriber (300 distinct
    ids), first arrivals in the station's order; inspection went on during the outage; the status topic says
    online."""
    topic = "plant/line3/cam1/verdict"
    station_dir = tmp_path / "station"
    config = write_station(station_dir, model_file, [quick_retry({"mqtt": {"url": broker.url, "topic": topic,
                                                                           "qos": 1}}, 0.1, 1.0),
                                                     {"csv": {"path": "verdicts.csv"}}])
    subscriber = Subscriber(broker, [topic, f"{topic}/status"])
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    images = stream(textile_images, 300)
    try:
        with running(config) as station:
            for i, src in enumerate(images[:100]):
                land(src, incoming, f"P{i:04d}_{src.name}")
            wait_for(lambda: len({json.loads(p)["id"] for p in subscriber.on(topic)}) >= 50, 120,
                     "the first 50 verdicts on MQTT")
            broker.stop()
            outage = time.monotonic()
            for i, src in enumerate(images[100:], start=100):
                land(src, incoming, f"P{i:04d}_{src.name}")
            wait_for(lambda: station.judged >= 300, 120, "300 verdicts during the outage")
            judged_in_outage = time.monotonic() - outage
            time.sleep(max(0.0, 10 - judged_in_outage))
            broker.start()
            wait_for(lambda: len({json.loads(p)["id"] for p in subscriber.on(topic)}) >= 300, 120,
                     "300 distinct verdicts after the broker came back")
        assert judged_in_outage < 10  # the inspection did not wait for the broker
        rows = store_rows(station_dir)
        assert len(rows) == 300 and len({r[0] for r in rows}) == 300
        received = [json.loads(p) for p in subscriber.on(topic)]
        first_seen = list(dict.fromkeys(m["id"] for m in received))
        assert first_seen == [r[0] for r in rows]  # the station's order, repeats aside
        assert {m["part_id"] for m in received} == {f"P{i:04d}" for i in range(300)}
        m = received[-1]
        assert {"id", "station", "part_id", "path", "verdict", "score", "threshold", "label", "probabilities",
                "reason", "model_sha256", "time", "latency_ms"} <= set(m)
        assert Path(m["path"]).is_file() and Path(m["path"]).parent.name == m["verdict"]
        # each message carries the peak and the defect regions that `anomaly predict` gives for its image
        from fewvision.modelfile import load
        from fewvision.tasks.anomaly import score_files

        first = {}
        for message in received:
            first.setdefault(message["part_id"], message)
        by_source = {str(images[int(part[1:])]): message for part, message in sorted(first.items())}
        want = {r["path"]: r for r in score_files(load(model_file), list(by_source), use_cache=False).rows}
        for source, message in by_source.items():
            w = want[source]
            assert (message["x"], message["y"], message["n_regions"], message["largest_region_px"]) == \
                (w["x"], w["y"], w["n_regions"], w["largest_region_px"]), source
            assert [{**r, "peak": 0} for r in message["regions"]] == [{**r, "peak": 0} for r in w["regions"]]
            assert [r["peak"] for r in message["regions"]] == pytest.approx([r["peak"] for r in w["regions"]],
                                                                            rel=1e-5)
        assert sum(message["n_regions"] > 0 for message in by_source.values()) >= 3
        assert subscriber.on(f"{topic}/status")[-1] == "offline"  # stopped cleanly, said so
        assert "online" in subscriber.on(f"{topic}/status")
        csv_ids = [line.split(",")[0] for line in (station_dir / "verdicts.csv").read_text().splitlines()[1:]]
        assert list(dict.fromkeys(csv_ids)) == [r[0] for r in rows]
        assert not list(incoming.iterdir())
    finally:
        subscriber.close()


def test_a_webhook_that_fails_five_times_gets_each_verdict_with_its_id(tmp_path, model_file, textile_images):
    """500 five times, then 200: every verdict delivered, the retries carrying the same id and a valid HMAC-SHA256
    signature. A 400 is the receiver refusing that message: not sent again, counted, the next ones go on. (The
    station runs a packed model here.)"""
    import hashlib

    from fewvision.deploy.pack import pack_model
    from fewvision.station.config import load_config
    from fewvision.station.status import station_status

    packed = tmp_path / "textile.fvz"
    pack_model(model_file, packed)

    os.environ["FV_TEST_MES_HMAC"] = "s3cret"
    station_dir = tmp_path / "station"
    receiver = WebhookReceiver([500] * 5)
    refusing = WebhookReceiver(lambda body, n: 400 if body["part_id"] == "P0001" else 200)
    config = write_station(station_dir, packed,
                           [quick_retry({"webhook": {"url": receiver.url, "secret_env": "FV_TEST_MES_HMAC"}}),
                            quick_retry({"webhook": {"url": refusing.url, "name": "refusing"}})])
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    try:
        with running(config):
            for i, src in enumerate(stream(textile_images, 4)):
                land(src, incoming, f"P{i:04d}_{src.name}")
            wait_for(lambda: len(receiver.bodies(200)) >= 4 and len(refusing.requests) >= 4, 60,
                     "4 deliveries to each webhook")
        ids = [r[0] for r in store_rows(station_dir)]
        assert [b["id"] for b in receiver.bodies(200)] == ids
        assert {b["model_sha256"] for b in receiver.bodies()} == {hashlib.sha256(packed.read_bytes()).hexdigest()}
        failed = receiver.bodies(500)
        assert len(failed) == 5 and {b["id"] for b in failed} == {ids[0]}  # the first verdict, retried
        for headers, body, _ in receiver.requests:
            assert headers["X-Fewvision-Signature"] == signed("s3cret", body)
            assert headers["X-Fewvision-Id"] == json.loads(body)["id"]
        assert [b["part_id"] for b in refusing.bodies()] == ["P0000", "P0001", "P0002", "P0003"]  # no retry of 400
        st = {s["name"]: s for s in station_status(load_config(config))["sinks"]}
        assert (st["webhook"]["delivered"], st["webhook"]["failures"], st["webhook"]["backlog"]) == (4, 5, 0)
        assert (st["refusing"]["delivered"], st["refusing"]["rejected"]) == (3, 1)
        assert "HTTP 400" in st["refusing"]["last_error"]
    finally:
        receiver.close()
        refusing.close()
        os.environ.pop("FV_TEST_MES_HMAC", None)


def test_kill_9_mid_stream_then_restart_judges_every_image_once(tmp_path, model_file, broker, textile_images):
    """``fewvision station run`` killed with SIGKILL while images stream in and the broker is down (verdicts
    recorded, not yet delivered), then the broker and the station started again: every image has exactly one
    verdict, each sink got every verdict at least once. A last kill leaves the broker to publish the will."""
    topic = "plant/line3/cam1/verdict"
    station_dir = tmp_path / "station"
    config = write_station(station_dir, model_file, [{"mqtt": {"url": broker.url, "topic": topic}},
                                                     {"csv": {"path": "verdicts.csv"}}])
    subscriber = Subscriber(broker, [topic, f"{topic}/status"])
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    images = stream(textile_images, 120)
    writer_done = threading.Event()

    def camera():
        for i, src in enumerate(images):
            land(src, incoming, f"P{i:04d}_{src.name}")
            time.sleep(0.02)
        writer_done.set()

    def on_mqtt() -> set[str]:
        return {json.loads(p)["id"] for p in subscriber.on(topic)}

    proc = station_process(config)
    try:
        def started() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            return (station_dir / "station.sqlite").exists()

        wait_for(started, 120, "the station")
        threading.Thread(target=camera, daemon=True).start()
        wait_for(lambda: len(on_mqtt()) >= 20, 120, "20 verdicts on MQTT")
        broker.stop()
        wait_for(lambda: len(store_rows(station_dir)) >= len(on_mqtt()) + 20, 120, "20 verdicts in the outage")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_at = len(store_rows(station_dir))
        broker.start()
        writer_done.wait(60)
        proc = station_process(config)
        wait_for(lambda: not list(incoming.iterdir()), 180, "every image judged after the restart")
        rows = store_rows(station_dir)
        wait_for(lambda: len(on_mqtt()) >= len(rows), 60, "every verdict on MQTT")
        wait_for(lambda: subscriber.on(f"{topic}/status")[-1:] == ["online"], 30, "the station online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: subscriber.on(f"{topic}/status")[-1:] == ["offline"], 60, "the last will after a kill")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=60)[0].decode()
        subscriber.close()
    assert killed_at < 120  # the kill came mid-stream
    assert len(rows) == 120
    names = Counter(r[1] for r in rows)
    assert len(names) == 120 and set(names.values()) == {1}
    assert {r[0] for r in rows} == on_mqtt()
    csv_ids = {line.split(",")[0] for line in (station_dir / "verdicts.csv").read_text().splitlines()[1:]}
    assert csv_ids == {r[0] for r in rows}
    assert all(Path(r[3]).is_file() for r in rows), out[-2000:]


def test_mqtt_over_tls_with_a_password(tmp_path, model_file, textile_images):
    """The broker takes only known users, the station connects over TLS (its CA given, the password from the
    environment): verdicts arrive. A wrong password is a delivery that fails, retried, and shown in the status."""
    from fewvision.station.config import load_config
    from fewvision.station.status import station_status

    tls = tls_files(tmp_path / "tls")
    broker = Broker(tmp_path / "mosquitto", passwords(tmp_path / "mosquitto", {"station": "pw-station",
                                                                              "reader": "pw-reader"}), tls)
    broker.start()
    os.environ["FV_TEST_MQTT_PASSWORD"] = "pw-station"
    topic = "plant/line3/cam1/verdict"
    sink = {"url": f"mqtts://127.0.0.1:{broker.tls_port}", "topic": topic, "username": "station",
            "password_env": "FV_TEST_MQTT_PASSWORD", "tls": {"ca": str(tls["ca"])}}
    subscriber = Subscriber(broker, [topic], client_id="reader-tls", username="reader", password="pw-reader")
    try:
        for password, expect in (("pw-station", 3), ("wrong", 0)):
            os.environ["FV_TEST_MQTT_PASSWORD"] = password
            station_dir = tmp_path / f"station-{password}"
            config = write_station(station_dir, model_file, [quick_retry({"mqtt": sink}, 0.1, 0.2)])
            (station_dir / "incoming").mkdir(parents=True)
            before = len(subscriber.on(topic))
            with running(config) as station:
                for i, src in enumerate(stream(textile_images, 3)):
                    land(src, station_dir / "incoming", f"P{i:04d}_{src.name}")
                wait_for(lambda: station.judged >= 3, 60, "3 verdicts")
                if expect:
                    wait_for(lambda: len(subscriber.on(topic)) >= before + expect, 30, "the verdicts over TLS")
                else:
                    time.sleep(1.5)
            st = station_status(load_config(config))["sinks"][0]
            if expect:
                ids = {json.loads(p)["id"] for p in subscriber.on(topic)[before:]}
                assert ids == {r[0] for r in store_rows(station_dir)} and st["backlog"] == 0
            else:
                assert len(subscriber.on(topic)) == before and st["backlog"] == 3 and st["failures"] >= 1
                assert "not connected" in st["last_error"]
    finally:
        subscriber.close()
        broker.stop()
        os.environ.pop("FV_TEST_MQTT_PASSWORD", None)


def test_a_crash_between_the_commit_and_the_move_is_finished_not_judged_again(tmp_path, model_file,
                                                                              textile_images):
    from fewvision.station.config import load_config
    from fewvision.station.run import Station, StationBusy

    station_dir = tmp_path / "station"
    config = write_station(station_dir, model_file, [{"csv": {"path": "verdicts.csv"}}],
                           source={"settle_s": 0.05})
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    for i, src in enumerate(stream(textile_images, 5)):
        land(src, incoming, f"P{i:04d}_{src.name}")
    first = Station(load_config(config))
    with pytest.raises(StationBusy, match="station cam1 already runs on"):  # one process per station and store
        Station(load_config(config))
    first._move = lambda arrival, dest: None  # the process dies right after the commit

    def judge_some() -> bool:
        arrivals = first.folder.ready()
        if arrivals:
            first.process(arrivals)
        return len(store_rows(station_dir)) >= 5

    wait_for(judge_some, 30, "5 verdicts")
    first.close()
    assert len(list(incoming.iterdir())) == 5
    with running(config):
        wait_for(lambda: not list(incoming.iterdir()), 30, "the moves finished")
    rows = store_rows(station_dir)
    assert len(rows) == 5 and all(Path(r[3]).is_file() for r in rows)
    outbox = store_rows(station_dir, "select payload from outbox")
    assert sorted(json.loads(p[0])["id"] for p in outbox) == sorted(r[0] for r in rows)
    # a week later the delivered messages go (the verdicts stay); younger ones stay
    age_outbox(station_dir, "2000-01-01 00:00:00.000000", "id <= 3")
    pruner = Station(load_config(config))
    try:
        assert pruner.prune_outbox() == 3
    finally:
        pruner.close()
    assert len(store_rows(station_dir, "select id from outbox")) == 2 and len(store_rows(station_dir)) == 5


def test_slow_and_corrupt_files(tmp_path, model_file, textile_images):
    """A PNG and a BMP written in pieces over 2 s are judged once complete, on their whole bytes; a corrupt file
    gets verdict error with the reason, goes to error/, and the next image is judged."""
    from PIL import Image

    station_dir = tmp_path / "station"
    config = write_station(station_dir, model_file, [], source={"settle_s": 0.5})
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    good, _ = textile_images
    slow = {}
    for fmt in ("png", "bmp"):
        path = tmp_path / f"whole.{fmt}"
        Image.open(good[30]).save(path)
        slow[fmt] = path.read_bytes()
    with running(config) as station:
        def write_slowly(fmt, name):
            data = slow[fmt]
            with open(incoming / name, "wb") as f:
                for k in range(10):
                    if k:
                        time.sleep(0.2)
                    f.write(data[k * len(data) // 10:(k + 1) * len(data) // 10])
                    f.flush()
                return time.time()

        finished = {}
        threads = [threading.Thread(target=lambda f=fmt: finished.__setitem__(f, write_slowly(f, f"SLOW{f}_x.{f}")))
                   for fmt in slow]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (incoming / "BAD1_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(3000) + b"IEND\xaeB`\x82")
        time.sleep(0.1)
        land(good[31], incoming, "NEXT_after.jpg")
        wait_for(lambda: station.judged >= 4, 60, "4 verdicts")
    rows = {r[1]: r for r in store_rows(station_dir, "select uid, filename, decision, path, reason, created_at, "
                                                      "image_sha256 from predictions")}
    import hashlib
    from datetime import datetime, timezone

    for fmt, data in slow.items():
        r = rows[f"SLOW{fmt}_x.{fmt}"]
        assert r[2] in ("accept", "reject") and r[6] == hashlib.sha256(data).hexdigest()
        assert datetime.fromisoformat(r[5]).replace(tzinfo=timezone.utc).timestamp() >= finished[fmt]
    bad = rows["BAD1_corrupt.png"]
    assert bad[2] == "error" and bad[4] == "not an image (unknown or unsupported format)", bad
    assert Path(bad[3]).parent.name == "error" and Path(bad[3]).is_file()
    assert rows["NEXT_after.jpg"][2] in ("accept", "reject")


def test_10000_files_waiting_at_start(tmp_path, model_file, textile_images):
    """10,000 images already in the folder: the first verdicts come without reading them all, and memory stays
    flat while the backlog drains (resident memory between the 100th and the 400th verdict)."""
    station_dir = tmp_path / "station"
    config = write_station(station_dir, model_file, [{"csv": {"path": "verdicts.csv"}}], source={"settle_s": 0.2})
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    good, _ = textile_images
    for i in range(10_000):
        os.link(good[20 + i % 50], incoming / f"P{i:05d}_{good[20 + i % 50].name}")

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    import tracemalloc

    tracemalloc.start()
    try:
        with running(config) as station:
            wait_for(lambda: station.judged >= 100, 120, "100 verdicts")
            at_100 = rss_mb(), tracemalloc.get_traced_memory()[0] / 2**20
            wait_for(lambda: station.judged >= 400, 120, "400 verdicts")
            at_400 = rss_mb(), tracemalloc.get_traced_memory()[0] / 2**20
    finally:
        tracemalloc.stop()
    # measured: Python's allocations +0.06 MB from the 100th to the 400th verdict; resident memory moves by up to
    # 70 MB either way (allocator arenas) with no trend over 2,000 verdicts. The 10,000 decoded images: 1.9 GB.
    assert at_400[1] - at_100[1] < 5, (at_100, at_400)
    assert at_400[0] - at_100[0] < 150, (at_100, at_400)
    rows = store_rows(station_dir)
    assert len(rows) >= 400 and len({r[0] for r in rows}) == len(rows)
    files = {f"P{i:05d}_{good[20 + i % 50].name}": good[20 + i % 50].stat().st_mtime_ns for i in range(10_000)}
    oldest_first = sorted(files, key=lambda name: (files[name], name))  # then by name
    assert [r[1] for r in rows] == oldest_first[:len(rows)]


def test_opcua_nodes_follow_the_verdicts(tmp_path, model_file, textile_images):
    """An asyncua client subscribed to the station's nodes sees every verdict's id, the counters per verdict and
    the heartbeat; the model's sha256 is served."""
    import hashlib

    from asyncua import ua
    from asyncua.sync import Client
    from service_helpers import free_port

    port = free_port()
    station_dir = tmp_path / "station"
    endpoint = f"opc.tcp://127.0.0.1:{port}/fewvision/"
    config = write_station(station_dir, model_file, [{"opcua": {"endpoint": endpoint}}])
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    seen: list[tuple[str, object]] = []

    class Handler:
        def datachange_notification(self, node, val, data):
            seen.append((node.nodeid.Identifier, val))

    with running(config) as station:
        wait_for(lambda: station.deliveries[0].opened, 30, "the OPC UA server")
        with Client(endpoint) as client:
            ns = client.get_namespace_index("urn:fewvision:station")
            node = lambda key: client.get_node(ua.NodeId(f"cam1.{key}", ns))  # noqa: E731
            sub = client.create_subscription(50, Handler())
            sub.subscribe_data_change([node(k) for k in ("LastId", "OkCount", "NgCount", "Heartbeat")])
            for i, src in enumerate(stream(textile_images, 10)):
                land(src, incoming, f"P{i:04d}_{src.name}")
            wait_for(lambda: station.judged >= 10, 60, "10 verdicts")
            wait_for(lambda: node("LastId").read_value() == store_rows(station_dir)[-1][0], 30, "the last id")
            time.sleep(1.2)
            counts = Counter(r[2] for r in store_rows(station_dir))
            assert node("OkCount").read_value() == counts["accept"]
            assert node("NgCount").read_value() == counts["reject"]
            assert node("ModelSha256").read_value() == hashlib.sha256(model_file.read_bytes()).hexdigest()
            assert node("LastVerdict").read_value() in ("ok", "ng")
            last_regions = json.loads(store_rows(station_dir, "select regions from predictions order by id")[-1][0])
            assert node("LastRegionCount").read_value() == len(last_regions) > 0  # the last image is a defect
            assert node("LastLargestRegionPct").read_value() == pytest.approx(last_regions[0]["area_pct"])
            assert node("Alarm").read_value() is False
            # an alarm message (the monitor's, through the outbox) sets the Alarm node and its message
            station.deliveries[0].sink.send({"kind": "alarm", "alarm": "martingale", "active": True,
                                             "message": "the scores stopped looking like the calibration images"})
            assert node("Alarm").read_value() is True
            assert node("AlarmMessage").read_value().startswith("the scores stopped looking")
    ids = [v for k, v in seen if k == "cam1.LastId" and v]
    assert set(ids) == {r[0] for r in store_rows(station_dir)}
    beats = [v for k, v in seen if k == "cam1.Heartbeat"]
    assert beats and max(beats) >= 1


def test_status_metrics_and_the_service_page_read_the_same_store(tmp_path, model_file, textile_images):
    """A sink that is down shows its backlog in ``station status`` and on /metrics; ``serve`` over the station's
    store lists the station's predictions and their images."""
    from typer.testing import CliRunner

    from fewvision.cli import app
    from fewvision.service.common import Settings
    from fewvision.service.core import Service
    from service_helpers import free_port

    station_dir = tmp_path / "station"
    down = f"http://127.0.0.1:{free_port()}/nobody"
    config = write_station(station_dir, model_file, [{"csv": {"path": "verdicts.csv"}},
                                                     quick_retry({"webhook": {"url": down, "timeout_s": 0.5}})])
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    port = free_port()
    import urllib.request

    with running(config, metrics_port=port) as station:
        for i, src in enumerate(stream(textile_images, 6)):
            land(src, incoming, f"P{i:04d}_{src.name}")
        wait_for(lambda: station.judged >= 6, 60, "6 verdicts")
        csv_file = station_dir / "verdicts.csv"  # written by the sink's own thread, after the store commits
        wait_for(lambda: csv_file.exists() and len(csv_file.read_text().splitlines()) >= 7, 30, "the csv rows")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts = Counter(r[2] for r in store_rows(station_dir))
    verdict = {"accept": "ok", "reject": "ng"}
    for decision, n in counts.items():
        assert f'fewvision_station_verdicts_total{{station="cam1",verdict="{verdict[decision]}"}} {n:.1f}' in metrics
    assert 'fewvision_station_latency_seconds_count{station="cam1"} 6.0' in metrics
    assert 'fewvision_station_sink_backlog{sink="webhook",station="cam1"} 6.0' in metrics
    assert 'fewvision_station_sink_backlog{sink="csv",station="cam1"} 0.0' in metrics
    result = CliRunner().invoke(app, ["station", "status", str(config), "--json"])
    assert result.exit_code == 0, result.output
    st = json.loads(result.output)
    assert st["total"] == 6 and sum(st["verdicts"].values()) == 6
    sinks = {s["name"]: s for s in st["sinks"]}
    assert sinks["csv"]["backlog"] == 0 and sinks["csv"]["delivered"] == 6
    assert sinks["webhook"]["backlog"] == 6 and sinks["webhook"]["failures"] >= 1
    assert "URLError" in sinks["webhook"]["last_error"] or "Connection" in sinks["webhook"]["last_error"]
    text = CliRunner().invoke(app, ["station", "status", str(config)]).output
    assert "backlog 6" in text and "sink      csv (csv): backlog 0, delivered 6" in text

    age_outbox(station_dir, "2000-01-01 00:00:00.000000")  # old, but not delivered to the webhook: kept
    from fewvision.station.config import load_config
    from fewvision.station.run import Station

    pruner = Station(load_config(config))
    try:
        assert pruner.prune_outbox() == 0
    finally:
        pruner.close()
    assert len(store_rows(station_dir, "select id from outbox")) == 6

    service = Service(Settings(station_dir / "station.sqlite", worker=False))
    try:
        project = next(p for p in service.projects() if p["name"] == "cam1")
        items = service.predictions(project["id"])["items"]
        assert len(items) == 6
        path = service.prediction_file(items[0]["prediction_id"], "image")
        rows = {r[0]: r for r in store_rows(station_dir)}
        assert str(path) in {r[3] for r in rows.values()} and path.is_file()
    finally:
        service.stop()


def test_the_monitor_raises_a_drift_alarm_to_the_sinks_and_resumes_after_a_restart(tmp_path, model_file,
                                                                                   textile_images):
    """Good images, then blurred ones (Gaussian, sigma 2): the drift alarm is recorded (alarms table) and sent as an
    ``alarm`` message after the verdict that raised it; a restarted station rebuilds the monitor from the store
    (the same martingale) and raises nothing twice."""
    from PIL import Image, ImageFilter

    from fewvision.station.config import load_config
    from fewvision.station.run import Station

    good, _ = textile_images
    blurred = tmp_path / "blurred"
    blurred.mkdir()
    for p in good[50:80]:
        Image.open(p).filter(ImageFilter.GaussianBlur(2)).save(blurred / p.name)
    station_dir = tmp_path / "station"
    receiver = WebhookReceiver()
    config = write_station(station_dir, model_file, [quick_retry({"webhook": {"url": receiver.url}})],
                           monitor={"delta": 0.01})
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    try:
        with running(config) as station:
            for i, src in enumerate(good[20:50]):
                land(src, incoming, f"GOOD{i:03d}_{src.name}")
            wait_for(lambda: station.judged >= 30, 60, "30 verdicts")
            for i, src in enumerate(sorted(blurred.iterdir())):
                land(src, incoming, f"BLUR{i:03d}_{src.name}")
            wait_for(lambda: station.judged >= 60, 60, "60 verdicts")
            wait_for(lambda: any(b["kind"] == "alarm" for b in receiver.bodies()), 30, "the alarm message")
            before = station.monitor.martingale.value, station.monitor.pvalues.seen
        alarms = store_rows(station_dir, "select a.kind, p.filename, a.message from alarms a join predictions p "
                                         "on p.id = a.prediction_id order by a.id")
        drift = [a for a in alarms if a[0] == "martingale"]
        assert drift and all(a[1].startswith("BLUR") for a in drift), alarms
        assert "over the threshold" in drift[0][2]
        from fewvision.station.status import station_status

        assert [a["kind"] for a in station_status(load_config(config))["open_alarms"]] == [a[0] for a in alarms]
        bodies = receiver.bodies()
        alarm = next(b for b in bodies if b["kind"] == "alarm" and b["alarm"] == "martingale")
        verdict_at = next(i for i, b in enumerate(bodies) if b.get("id") == alarm["verdict_id"])
        assert bodies.index(alarm) > verdict_at and alarm["part_id"].startswith("BLUR")
        again = Station(load_config(config))
        try:
            assert (again.monitor.martingale.value, again.monitor.pvalues.seen) == before
        finally:
            again.close()
        assert len(store_rows(station_dir, "select id from alarms")) == len(alarms)
        # a person resets the monitor through the service on the station's store: the running station follows,
        # starting again from the calibration scores (and a restart replays the reset where it was recorded)
        from fewvision.service.common import Settings
        from fewvision.service.core import Service

        n_cal = len(again.monitor.calibration)
        with running(config) as station:
            service = Service(Settings(station_dir / "station.sqlite", worker=False))
            try:
                project = next(p for p in service.projects() if p["name"] == "cam1")
                assert service.reset_monitor(project["id"])["kind"] == "reset"
            finally:
                service.stop()
            for i, src in enumerate(good[80:85]):
                land(src, incoming, f"AFTER{i:03d}_{src.name}")
            wait_for(lambda: station.judged >= 5 and station.monitor.pvalues.seen == n_cal + 5, 30,
                     "the monitor restarted from the calibration scores")
        again = Station(load_config(config))
        try:
            assert again.monitor.pvalues.seen == n_cal + 5
        finally:
            again.close()
    finally:
        receiver.close()


def test_a_tiled_model_judges_each_image_by_its_tiles_on_the_station(tmp_path, textile_images):
    """A model fitted with ``--tile``: the station's verdicts, scores, peaks and regions are the task function's
    rows for the same files (the station is a thin layer over them)."""
    from fewvision.modelfile import save_model
    from fewvision.tasks.anomaly import fit_anomaly, score_files

    good, bad = textile_images
    model = fit_anomaly(good[:10], "patchcore", "texture", tile=128, tile_overlap=0.0, target_false_reject=0.3,
                        use_cache=False)
    station_dir = tmp_path / "station"
    config = write_station(station_dir, save_model(tmp_path / "tiled.fvm", model), [])
    incoming = station_dir / "incoming"
    incoming.mkdir(parents=True)
    images = [good[40], bad[0], bad[1]]
    with running(config):
        for i, src in enumerate(images):
            land(src, incoming, f"P{i:04d}_{src.name}")
        wait_for(lambda: len(store_rows(station_dir)) >= 3, 60, "3 verdicts")
    got = store_rows(station_dir, "select score, x, y, regions from predictions order by id")
    want = score_files(model, images, use_cache=False).rows
    assert len(got) == len(want) == 3
    for (score, x, y, regions), w in zip(got, want):
        assert score == pytest.approx(w["score"], rel=1e-6) and (x, y) == (w["x"], w["y"])
        assert [b["x"] for b in json.loads(regions or "[]")] == [b["x"] for b in w["regions"]]
    assert sum(w["n_regions"] > 0 for w in want) >= 1  # a region reached the store's JSON
