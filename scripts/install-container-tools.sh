#!/usr/bin/env bash
# Install what tests/deploy/test_container.py needs to build and run the
# Dockerfile without a Docker engine, on a Debian (bookworm) machine, as root:
#   buildah      builds the Dockerfile (`buildah bud --isolation chroot`)
#   debootstrap  makes the local Debian base image the test builds on
#   uidmap       buildah's dependency (newuidmap/newgidmap)
#   util-linux   unshare and mount for running the image in a chroot
# Idempotent and quiet: installs only what is missing; prints one line.
set -euo pipefail

packages=(buildah debootstrap uidmap debian-archive-keyring gpgv ca-certificates util-linux coreutils tar)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  log="$(mktemp)"
  trap 'rm -f "$log"' EXIT
  if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-container-tools: apt-get failed installing: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "container tools: $(buildah --version), debootstrap $(dpkg-query -W -f='${Version}' debootstrap)"
