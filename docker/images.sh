#!/usr/bin/env bash
# Builds localhost/embeddeck-controller:dev and localhost/embeddeck-worker:dev from docker/Dockerfile.*
# with buildah (no Docker engine or image registry is needed).
#
# The base image and torch are build arguments. Production builds take the Dockerfiles' defaults (a public
# python:3.11-slim-bookworm base; the CUDA build of torch for workers). Where no image registry is reachable,
# BASE_IMAGE=local makes the base from Debian's own packages with debootstrap (bookworm, Debian's
# Python 3.11) and torch comes from the wheel pip would install on this machine (the CPU build here).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-dev}"
BASE_IMAGE="${BASE_IMAGE:-local}"
LOCAL_BASE=localhost/embeddeck-base:bookworm
STATE="${IMAGE_STATE:-$PWD/var/images}"
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

need() {
  local missing=""
  for tool in "$@"; do command -v "$tool" >/dev/null || missing="$missing $tool"; done
  if [ -n "$missing" ]; then
    echo "installing:$missing"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
}

local_base() {
  if $SUDO buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then return; fi
  need debootstrap
  local root="$STATE/bookworm-rootfs"
  $SUDO rm -rf "$root" && mkdir -p "$STATE"
  echo "making $LOCAL_BASE with debootstrap (about a minute)"
  $SUDO debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$STATE/debootstrap.log" 2>&1 \
    || { tail -20 "$STATE/debootstrap.log"; exit 1; }
  # What python:3.11-slim-bookworm also gets: security and point-release updates.
  printf '%s\n' "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" | $SUDO tee "$root/etc/apt/sources.list" >/dev/null
  $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  local ctr mnt
  ctr=$($SUDO buildah from scratch)
  mnt=$($SUDO buildah mount "$ctr")
  $SUDO tar -C "$root" -cf - . | $SUDO tar -C "$mnt" -xf -
  $SUDO buildah umount "$ctr" >/dev/null
  $SUDO buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  $SUDO buildah commit -q "$ctr" "$LOCAL_BASE" >/dev/null
  $SUDO buildah rm "$ctr" >/dev/null
  $SUDO rm -rf "$root"
}

need buildah
args=(--isolation chroot --layers)
if [ "$BASE_IMAGE" = local ]; then
  local_base
  args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
  # The torch wheel this machine's pip would install (a local CPU build here), offered to the build.
  wheels="$STATE/wheels"
  mkdir -p "$wheels"
  torch_pin=$(grep -E '^torch==' requirements.txt)
  ls "$wheels"/torch-* >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d "$wheels" "$torch_pin"
  torch_wheel=$(basename "$(ls "$wheels"/torch-*.whl | head -1)")
  args+=(--volume "$wheels:/wheels:ro" --build-arg "TORCH=/wheels/$torch_wheel" --build-arg TORCH_INDEX=)
  # The build's pip trusts what this machine trusts (its system bundle), so a TLS-inspecting proxy in front of
  # PyPI, as on these machines, works as it does for the host's pip.
  host_ca=/etc/ssl/certs/ca-certificates.crt
  if [ -f "$host_ca" ]; then
    args+=(--volume "$host_ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
  fi
elif [ -n "$BASE_IMAGE" ]; then
  args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi

for role in worker controller; do
  echo "building localhost/embeddeck-$role:$TAG"
  $SUDO buildah bud "${args[@]}" -f "docker/Dockerfile.$role" -t "localhost/embeddeck-$role:$TAG" . \
    >"$STATE/build-$role.log" 2>&1 || { tail -40 "$STATE/build-$role.log"; exit 1; }
done
$SUDO buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep embeddeck-
