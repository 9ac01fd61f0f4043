#!/usr/bin/env bash
# System tools the tests use that pip cannot install:
#   systemd-analyze           unit checks (tests/deploy/test_units.py)
#   mosquitto                 the real MQTT broker behind the bridge tests (issue 21)
#   chromium, chromedriver    the real browser behind the web page tests (issue 23)
# Never fails: a tool that cannot be installed here (no root, no apt, no network) is reported, and
# the tests that need it skip with the reason. pytest always starts.
set -uo pipefail

missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "warning: ${missing[*]} not found and cannot be installed here (needs root and apt-get);" \
       "the tests that need them will be skipped" >&2
  exit 0
fi
echo "installing ${missing[*]} ..."
if timeout 300 apt-get update -qq >/dev/null 2>&1 &&
   DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
     "${missing[@]}" >/dev/null 2>&1; then
  echo "installed ${missing[*]}"
else
  echo "warning: could not install ${missing[*]} (no network or no package source?);" \
       "the tests that need them will be skipped" >&2
fi
# Debian starts a system-wide broker on 1883 when it installs mosquitto; the tests start their own
# on free ports and do not need it.
exit 0
