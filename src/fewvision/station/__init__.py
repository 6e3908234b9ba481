"""The line station: a hot folder in, verdicts out to MQTT, OPC UA, webhooks and CSV (``fewvision station``)."""
