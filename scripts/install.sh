#!/usr/bin/env bash
# Install Coilsight on a line box as a systemd service. Run as root from a checkout (or an
# unpacked release) of this repository. Safe to re-run for an upgrade: the config in
# /etc/coilsight and keys are never overwritten.
#
#   scripts/install.sh [--profile steel] [--gpu] [--curve] [--no-start] [--skip-venv] [--root DIR]
#
#   --profile NAME  config profile to install as /etc/coilsight/NAME.toml (configs/NAME.toml);
#                   a profile other than steel gets a drop-in setting COILSIGHT_CONFIG.
#   --gpu           install the [gpu] extra (TensorRT, pycuda) into the venv.
#   --curve         generate the server's CURVE key pair in /etc/coilsight/curve (if absent).
#   --no-start      install and enable, but do not start (e.g. before keys are in place).
#   --skip-venv     do not (re)build /opt/coilsight/venv (files and units only).
#   --root DIR      stage everything under DIR instead of / (packaging, tests): no systemctl,
#                   sysusers/tmpfiles applied with --root; implies --no-start.
#
# Steps (docs/deployment.md has the why):
#   1. venv in /opt/coilsight/venv with the package (pip, from this checkout)
#   2. sysusers.d -> user/group coilsight;  tmpfiles.d -> /etc/coilsight, /var/lib/coilsight
#   3. units -> /etc/systemd/system;  docs -> /opt/coilsight/share/docs
#   4. config -> /etc/coilsight/PROFILE.toml (root:coilsight 0640, only if absent)
#   5. optional CURVE server key (root:root 0600; reaches the service via LoadCredential=)
#   6. coilsight check-config, systemctl daemon-reload, enable (and start) coilsight.service
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile=steel gpu=0 curve=0 start=1 venv=1 root=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a name}"; shift 2 ;;
        --gpu) gpu=1; shift ;;
        --curve) curve=1; shift ;;
        --no-start) start=0; shift ;;
        --skip-venv) venv=0; shift ;;
        --root) root="$(realpath -m "${2:?--root needs a directory}")"; start=0; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "install.sh: $*" >&2; exit 1; }
step() { echo "==> $*"; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and installs units)"
config_src="$src/configs/$profile.toml"
[ -f "$config_src" ] || die "no profile '$profile': $config_src does not exist"
for tool in systemd-sysusers systemd-tmpfiles; do
    command -v "$tool" >/dev/null || die "$tool not found; this installer needs systemd"
done

prefix="$root/opt/coilsight"
venv_dir="$prefix/venv"
etc="$root/etc/coilsight"
unit_dir="$root/etc/systemd/system"

# 1. venv --------------------------------------------------------------------------------
if [ "$venv" -eq 1 ]; then
    step "venv $venv_dir"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 >= 3.11 needed (found $(python3 --version 2>&1))"
    python3 -m venv "$venv_dir" || die "python3 -m venv failed; install the python3-venv package"
    extra="[mqtt]"  # paho-mqtt for coilsight-bridge.service (small, pure Python)
    [ "$gpu" -eq 1 ] && extra="[gpu,mqtt]"
    "$venv_dir/bin/pip" install --quiet --upgrade pip
    "$venv_dir/bin/pip" install --quiet "$src$extra"
fi

# 2. user and directories ----------------------------------------------------------------
step "sysusers.d + tmpfiles.d"
install -D -m 0644 "$src/systemd/sysusers.d/coilsight.conf" "$root/etc/sysusers.d/coilsight.conf"
install -D -m 0644 "$src/systemd/tmpfiles.d/coilsight.conf" "$root/etc/tmpfiles.d/coilsight.conf"
if [ -n "$root" ]; then
    systemd-sysusers --root="$root" "$root/etc/sysusers.d/coilsight.conf"
    systemd-tmpfiles --root="$root" --create "$root/etc/tmpfiles.d/coilsight.conf"
else
    systemd-sysusers /etc/sysusers.d/coilsight.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/coilsight.conf
fi

# 3. units and docs ----------------------------------------------------------------------
step "units -> $unit_dir"
install -D -m 0644 "$src/systemd/coilsight.service" "$unit_dir/coilsight.service"
install -D -m 0644 "$src/systemd/coilsight-engines.service" "$unit_dir/coilsight-engines.service"
# Installed, not enabled: the bridge needs /etc/coilsight/bridge.toml first (docs/deployment.md).
install -D -m 0644 "$src/systemd/coilsight-bridge.service" "$unit_dir/coilsight-bridge.service"
install -D -m 0644 "$src/systemd/coilsight-aggregate.service" "$unit_dir/coilsight-aggregate.service"
install -D -m 0644 "$src/docs/deployment.md" "$prefix/share/docs/deployment.md"
# The operator page (`coilsight web`): installed, not enabled (docs/deployment.md, "The web page").
install -D -m 0644 "$src/systemd/coilsight-web.service" "$unit_dir/coilsight-web.service"
if [ "$profile" != steel ]; then
    install -d -m 0755 "$unit_dir/coilsight.service.d" "$unit_dir/coilsight-engines.service.d" \
        "$unit_dir/coilsight-web.service.d"
    for d in coilsight coilsight-engines coilsight-web; do
        printf '[Service]\nEnvironment=COILSIGHT_CONFIG=/etc/coilsight/%s.toml\n' "$profile" \
            >"$unit_dir/$d.service.d/profile.conf"
    done
fi

# 4. config ------------------------------------------------------------------------------
config="$etc/$profile.toml"
if [ -e "$config" ]; then
    step "config $config exists, kept"
else
    step "config $config"
    install -m 0640 -o root -g coilsight "$config_src" "$config" 2>/dev/null \
        || install -m 0640 "$config_src" "$config"  # staged root: group not resolvable here
fi

# 5. CURVE server key --------------------------------------------------------------------
if [ "$curve" -eq 1 ]; then
    if [ -e "$etc/curve/server.key_secret" ]; then
        step "CURVE key $etc/curve/server.key_secret exists, kept"
    else
        step "CURVE key $etc/curve/server.key_secret"
        [ -x "$venv_dir/bin/coilsight" ] || die "no $venv_dir/bin/coilsight to generate keys with"
        "$venv_dir/bin/coilsight" keys generate --out "$etc/curve" --name server
        chown root:root "$etc/curve/server.key_secret"
        chmod 0600 "$etc/curve/server.key_secret"
        echo "    give $etc/curve/server.key (public) to cameras, subscribers and operators;"
        echo "    put their public keys (coilsight keys generate --role ...) in $etc/curve/cameras/,"
        echo "    $etc/curve/subscribers/ and $etc/curve/operators/ (docs/deployment.md, Roles)"
    fi
fi

# 6. check and enable --------------------------------------------------------------------
if [ -n "$root" ]; then
    step "staged under $root (no systemctl)"
    exit 0
fi
if [ -x "$venv_dir/bin/coilsight" ]; then
    step "check-config $config"
    "$venv_dir/bin/coilsight" check-config "$config" || die "fix $config, then re-run"
fi
systemctl daemon-reload
systemctl enable coilsight.service
if [ "$start" -eq 1 ]; then
    step "restart coilsight.service"
    systemctl restart coilsight.service
    systemctl --no-pager --lines=5 status coilsight.service || true
fi
