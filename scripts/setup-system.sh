#!/usr/bin/env bash
# Debian packages the test suite talks to for real. Idempotent: when all are installed it only
# asks dpkg and exits. Leaves no service running that the install started (Debian's postinst
# scripts would start dockerd, influxd and victoria-metrics where they can).
set -euo pipefail

PACKAGES=(docker.io docker-compose busybox-static influxdb victoria-metrics inotify-tools debootstrap apache2-utils)
# Process names as pgrep -x sees them: the kernel keeps 15 characters ("victoria-metric").
DAEMONS=(dockerd containerd influxd victoria-metric)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

if ((EUID != 0)); then
    echo "setup-system: installing ${missing[*]} needs root" >&2
    exit 1
fi

echo "setup-system: installing ${missing[*]}"

pids_of() {
    local name
    for name in "${DAEMONS[@]}"; do pgrep -x "$name" || true; done | sort
}
before=$(pids_of)

# invoke-rc.d asks policy-rc.d; exit 101 means "do not start services". Keep an existing one.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    if ((own_policy)); then rm -f "$policy"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}
if ! apt_install "${missing[@]}"; then
    echo "setup-system: install failed; refreshing package lists and retrying"
    apt-get update
    apt_install "${missing[@]}"
fi

# Belt and braces: stop any daemon that appeared during the install (never one that ran before).
after=$(pids_of)
started=$(comm -13 <(echo "$before") <(echo "$after") | grep -v '^$' || true)
if [[ -n $started ]]; then
    echo "setup-system: stopping services the install started: $started"
    for sig in TERM KILL; do
        for pid in $started; do kill -s "$sig" "$pid" 2>/dev/null || true; done
        for _ in $(seq 50); do
            alive=0
            for pid in $started; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.2
        done
    done
fi
echo "setup-system: done"
