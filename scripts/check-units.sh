#!/usr/bin/env bash
# Static checks of Coilsight's systemd files; exits non-zero on the first class of failure.
#
#   scripts/check-units.sh [UNITS_DIR]        (default: systemd/ beside this script)
#
# 1. `systemd-analyze verify` on every *.service. The units name /opt/coilsight/venv/bin/coilsight,
#    which does not exist on a build machine, so they are verified as copies in a temp dir with
#    that path replaced by an executable stub; nothing else is changed. verify exits 0 on
#    unknown keys and bad values (it only warns), so any output at all counts as a failure.
# 2. `systemd-analyze security --offline=yes` on every *.service: the overall exposure must be
#    <= COILSIGHT_EXPOSURE_MAX (default 2.0); warnings count as failures here too.
# 3. sysusers.d and tmpfiles.d applied to a scratch root (--root), checking the user and the
#    directories appear with the owners and modes asked for. Needs root (tmpfiles chowns);
#    skipped with a note otherwise.
#
# Needs systemd-analyze (Debian/Ubuntu package: systemd).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
units_dir="$(cd "${1:-$here/systemd}" && pwd)"
max="${COILSIGHT_EXPOSURE_MAX:-2.0}"
venv_bin="/opt/coilsight/venv/bin/coilsight"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-units: systemd-analyze not found; install the 'systemd' package" >&2
    exit 127
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0

shopt -s nullglob
units=("$units_dir"/*.service)
if [ ${#units[@]} -eq 0 ]; then
    echo "check-units: no *.service files in $units_dir" >&2
    exit 1
fi

# --- 1. verify -------------------------------------------------------------------------
mkdir -p "$work/units" "$work/bin"
printf '#!/bin/sh\nexit 0\n' >"$work/bin/coilsight"
chmod 0755 "$work/bin/coilsight"
for unit in "${units[@]}"; do
    sed "s#$venv_bin#$work/bin/coilsight#g" "$unit" >"$work/units/$(basename "$unit")"
done
verify_out="$(systemd-analyze verify "$work"/units/*.service 2>&1)" && verify_rc=0 || verify_rc=$?
if [ "$verify_rc" -ne 0 ] || [ -n "$verify_out" ]; then
    echo "check-units: systemd-analyze verify failed (rc=$verify_rc):" >&2
    printf '%s\n' "${verify_out//$work\/units\//$units_dir/}" >&2
    failed=1
else
    echo "verify: ok (${#units[@]} units)"
fi

# --- 2. security exposure --------------------------------------------------------------
for unit in "${units[@]}"; do
    name="$(basename "$unit")"
    out="$(systemd-analyze security --offline=yes "$unit" 2>"$work/security.err")" || true
    if [ -s "$work/security.err" ]; then
        echo "check-units: systemd-analyze security warned about $name:" >&2
        cat "$work/security.err" >&2
        failed=1
    fi
    score="$(printf '%s\n' "$out" | sed -n 's/^→ Overall exposure level for .*: \([0-9.]*\) .*/\1/p')"
    if [ -z "$score" ]; then
        echo "check-units: no exposure figure for $name in systemd-analyze output" >&2
        failed=1
    elif awk -v s="$score" -v m="$max" 'BEGIN { exit !(s > m) }'; then
        echo "check-units: $name exposure $score > $max" >&2
        printf '%s\n' "$out" | grep '✗' >&2 || true
        failed=1
    else
        echo "security: $name exposure $score <= $max"
    fi
done

# --- 3. sysusers.d + tmpfiles.d on a scratch root ----------------------------------------
sysusers="$units_dir/sysusers.d/coilsight.conf"
tmpfiles="$units_dir/tmpfiles.d/coilsight.conf"
if [ "$(id -u)" -ne 0 ]; then
    echo "sysusers/tmpfiles: skipped (needs root to chown in the scratch root)"
elif ! command -v systemd-sysusers >/dev/null || ! command -v systemd-tmpfiles >/dev/null; then
    echo "sysusers/tmpfiles: skipped (systemd-sysusers/systemd-tmpfiles not installed)"
else
    root="$work/root"
    mkdir -p "$root/etc"
    if ! err="$(systemd-sysusers --root="$root" "$sysusers" 2>&1)" \
        || ! grep -q '^coilsight:' "$root/etc/passwd" 2>/dev/null; then
        echo "check-units: systemd-sysusers did not create user coilsight from $sysusers:" >&2
        printf '%s\n' "$err" >&2
        failed=1
    elif ! err="$(systemd-tmpfiles --root="$root" --create "$tmpfiles" 2>&1)"; then
        echo "check-units: systemd-tmpfiles --create failed for $tmpfiles:" >&2
        printf '%s\n' "$err" >&2
        failed=1
    else
        uid="$(awk -F: '$1 == "coilsight" { print $3 }' "$root/etc/passwd")"
        while read -r path mode owner; do
            want_uid=0
            [ "$owner" = coilsight ] && want_uid="$uid"
            got="$(stat -c '%a %u' "$root$path" 2>/dev/null || echo missing)"
            if [ "$got" != "$mode $want_uid" ]; then
                echo "check-units: $path from $tmpfiles is '$got', expected '$mode $want_uid'" >&2
                failed=1
            fi
        done <<'EOF'
/etc/coilsight 750 root
/etc/coilsight/curve/cameras 750 root
/etc/coilsight/curve/subscribers 750 root
/etc/coilsight/curve/operators 750 root
/etc/coilsight/curve/clients 750 root
/var/lib/coilsight 750 coilsight
/var/lib/coilsight/engines 750 coilsight
EOF
        [ "$failed" -eq 0 ] && echo "sysusers/tmpfiles: ok"
    fi
fi

exit "$failed"
