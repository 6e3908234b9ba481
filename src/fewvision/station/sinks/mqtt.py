"""MQTT sink (paho-mqtt): each message published as JSON to ``topic`` and, at QoS 1 or 2, sent again until the
broker acknowledges it; the station's status (``online`` / ``offline``, the last will) retained on ``status_topic``.

One message is in flight at a time, so what a subscriber first sees of each message keeps the station's order; a
message may arrive twice (QoS 1 is at least once), with the same ``id``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .base import known_options, positive

ONLINE, OFFLINE = "online", "offline"


def check_options(options: dict, base: Path) -> dict:
    known_options(options, {"url", "topic", "qos", "username", "password_env", "tls", "client_id", "status_topic",
                            "keepalive_s", "timeout_s", "retain", "alarm_topic"})
    url = options.get("url", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"url: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
    topic = options.get("topic")
    if not isinstance(topic, str) or not topic or any(c in topic for c in "#+\x00"):
        raise ValueError(f"topic: expected a topic name without wildcards, got {topic!r}")
    qos = options.get("qos", 1)
    if qos not in (0, 1, 2):
        raise ValueError(f"qos: expected 0, 1 or 2, got {qos!r}")
    tls = options.get("tls")
    if tls is not None:
        if not isinstance(tls, dict):
            raise ValueError("tls: expected a mapping (ca, cert, key, insecure)")
        known_options(tls, {"ca", "cert", "key", "insecure"})
        tls = {k: (v if k == "insecure" else str(Path(v) if Path(v).is_absolute() else base / v))
               for k, v in tls.items()}
    elif parts.scheme == "mqtts":
        tls = {}
    status = options.get("status_topic", f"{topic}/status")
    return {"host": parts.hostname, "port": parts.port or (8883 if tls is not None else 1883), "topic": topic,
            "qos": qos, "username": options.get("username"), "password_env": options.get("password_env"),
            "tls": tls, "client_id": options.get("client_id"), "status_topic": status,
            "alarm_topic": options.get("alarm_topic", f"{topic}/alarm"),
            "keepalive_s": int(positive(options, "keepalive_s", 30)), "timeout_s": positive(options, "timeout_s", 5),
            "retain": bool(options.get("retain", False))}


class MqttSink:
    def __init__(self, name: str, options: dict, station: str, context: dict):
        self.name, self.options, self.station = name, options, station
        self.client = None
        self._connected = threading.Event()

    def open(self) -> None:
        import paho.mqtt.client as mqtt

        o = self.options
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=o["client_id"] or f"fewvision-{self.station}")
        if o["username"]:
            password = os.environ.get(o["password_env"]) if o["password_env"] else None
            if o["password_env"] and password is None:
                raise RuntimeError(f"sink {self.name}: the environment variable {o['password_env']} (password_env) "
                                   "is not set")
            client.username_pw_set(o["username"], password)
        if o["tls"] is not None:
            client.tls_set(ca_certs=o["tls"].get("ca"), certfile=o["tls"].get("cert"), keyfile=o["tls"].get("key"))
            if o["tls"].get("insecure"):
                client.tls_insecure_set(True)
        client.will_set(o["status_topic"], OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self._connected.clear()
        client.connect_async(o["host"], o["port"], keepalive=o["keepalive_s"])
        client.loop_start()
        self.client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.publish(self.options["status_topic"], ONLINE, qos=1, retain=True)
            self._connected.set()

    def send(self, message: dict) -> None:
        o = self.options
        if not self._connected.wait(o["timeout_s"]):
            raise ConnectionError(f"not connected to the MQTT broker {o['host']}:{o['port']}")
        topic = o["alarm_topic"] if message.get("kind") == "alarm" else o["topic"]
        info = self.client.publish(topic, json.dumps(message, sort_keys=True), qos=o["qos"], retain=o["retain"])
        info.wait_for_publish(timeout=o["timeout_s"])
        if not info.is_published():
            raise TimeoutError(f"the MQTT broker {o['host']}:{o['port']} did not acknowledge within "
                               f"{o['timeout_s']:g} s")

    def close(self) -> None:
        if self.client is not None:
            if self._connected.is_set():  # a clean stop says so itself (the will is for the unclean ones)
                self.client.publish(self.options["status_topic"], OFFLINE, qos=1, retain=True).wait_for_publish(2)
            self.client.disconnect()
            self.client.loop_stop()
