#!/usr/bin/env bash
# System tools the tests use that pip cannot install: systemd-analyze (unit checks).
set -euo pipefail
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
  else
    echo "warning: systemd-analyze not found and cannot be installed here; unit checks will be skipped" >&2
  fi
fi
