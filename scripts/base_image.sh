#!/bin/sh
# `make images OFFLINE=1`, step 1: a Debian bookworm base image made on this machine, for builds
# that reach no container registry. debootstrap (minbase) + Python 3.11 from Debian, imported
# with `docker import`. Cached: an existing image is kept unless REBUILD_BASE=1.
#   scripts/base_image.sh [IMAGE]          (default ztbank-base:bookworm)
set -eu
image="${1:-ztbank-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if [ "${REBUILD_BASE:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists (REBUILD_BASE=1 rebuilds it)"
    exit 0
fi
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "base_image.sh: $tool is missing (apt-get install $tool)" >&2
        exit 2
    }
done
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT INT TERM
echo "base image $image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    echo "base_image.sh: debootstrap failed; its log is $rootfs.log" >&2
    exit 1
}
# What the image does not need at run time: package caches, docs, the apt lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
rm -f "$rootfs.log"
echo "base image $image: $(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}')"
