#!/usr/bin/env bash
# System tools the tests use that pip cannot install: systemd-analyze (unit checks).
# Never fails: a tool that cannot be installed here (no root, no apt, no network) is reported, and
# the tests that need it skip with the reason (tests/deploy/test_units.py). pytest always starts.
set -uo pipefail

want_systemd_analyze() {
  command -v systemd-analyze >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: systemd-analyze not found and cannot be installed here (needs root and apt-get);" \
         "the unit checks will be skipped" >&2
    return 0
  fi
  echo "installing systemd (for systemd-analyze) ..."
  if timeout 300 apt-get update -qq >/dev/null 2>&1 &&
     DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 &&
     command -v systemd-analyze >/dev/null 2>&1; then
    echo "installed systemd-analyze"
  else
    echo "warning: could not install systemd (no network or no package source?);" \
         "the unit checks will be skipped" >&2
  fi
  return 0
}

want_systemd_analyze
exit 0
