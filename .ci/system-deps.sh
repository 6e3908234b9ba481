#!/usr/bin/env bash
# The system packages the test suite needs, from Debian: PostgreSQL (a real server for the store tests), Chromium
# (the page tests drive it with Playwright) and Mosquitto (the station's MQTT sink is tested against it). Installs
# what is missing when run as root; otherwise says what to install.
set -euo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "the tests need these Debian packages: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  exit 0  # the tests that need them fail with the same hint
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
