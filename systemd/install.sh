#!/bin/sh
# Install berth as a systemd service, as root. The README's install steps are this file, and
# tests/test_systemd.py runs it in a Debian 12 container with systemd as PID 1.
#
#   systemd/install.sh .                                            # from a source checkout
#   systemd/install.sh --no-index --find-links /path/to/wheels berth   # offline, from wheels
#
# Arguments go to pip. An existing /etc/berth/config.toml and admin token are kept.
set -eu
here=$(cd "$(dirname "$0")" && pwd)

python3 -m venv /opt/berth
/opt/berth/bin/pip install -q --disable-pip-version-check "$@"
install -d -m 0755 /etc/berth
[ -e /etc/berth/config.toml ] || install -m 0640 "$here/../config.example.toml" /etc/berth/config.toml
[ -e /etc/berth/admin-token ] || (umask 077 && head -c 32 /dev/urandom | base64 > /etc/berth/admin-token)
/opt/berth/bin/berthd check-config /etc/berth/config.toml
install -m 0644 "$here/berthd.service" /etc/systemd/system/berthd.service
systemctl daemon-reload
systemctl enable --now berthd
