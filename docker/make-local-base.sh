#!/usr/bin/env bash
# Make a minimal Debian bookworm base image with Python 3.11 from Debian's package registry, for a
# Docker engine that reaches no image registry (no `docker pull`). Needs root, debootstrap and a
# running Docker engine. Debian bookworm's python3 is 3.11, the version the wheels are built for.
#
#   docker/make-local-base.sh [--force] [IMAGE]     # default IMAGE trunkseg-base:bookworm
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DOCKER (default docker).
# Skips the work when IMAGE exists already, unless --force.
set -euo pipefail

die() { echo "make-local-base: $*" >&2; exit 2; }

force=0
image=trunkseg-base:bookworm
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) image=$arg ;;
    esac
done
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

command -v "$docker" >/dev/null || die "no '$docker' command (install docker.io)"
"$docker" info >/dev/null 2>&1 || die "no Docker engine reachable (start dockerd)"
if [ "$force" = 0 ] && "$docker" image inspect "$image" >/dev/null 2>&1; then
    echo "make-local-base: $image exists (use --force to remake it)" >&2
    exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/trunkseg-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
started=$SECONDS
echo "make-local-base: debootstrap bookworm from $mirror into $rootfs" >&2
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    die "debootstrap failed (log above)"
fi
rm -f "$rootfs.log"

# Leave no package caches, lists or docs behind; keep the licences (/usr/share/doc/*/copyright).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/var/log/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
       "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs"/usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
printf 'deb %s bookworm main\n' "$mirror" >"$rootfs"/etc/apt/sources.list

tar --numeric-owner -C "$rootfs" -c . | "$docker" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates" \
    - "$image" >/dev/null
size=$("$docker" image inspect -f '{{.Size}}' "$image")
echo "make-local-base: made $image ($((size / 1000000)) MB) in $((SECONDS - started)) s" >&2
