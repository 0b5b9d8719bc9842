#!/usr/bin/env bash
# Build the package for a Debian release other than the build machine's, inside a root of it.
#
#   usage: packaging/build-in-root.sh RELEASE VERSION WHEEL_CACHE   (make deb RELEASE=trixie)
#
# The package's private venv must be made by the target's own /usr/bin/python3 (the wheels'
# C extensions are per CPython minor version, and the venv links that interpreter), so the
# build runs where that interpreter is: a minimal root of RELEASE made by debootstrap with
# the build dependencies (cached under /var/cache/vicifast-agent-build/roots/, one per release
# and package list, never modified afterwards), started by systemd-nspawn with a throwaway
# overlay (--volatile=overlay) and this tree and the wheel cache bound in. Inside, it is the
# same packaging/build-deb.sh that `make deb` runs on a machine of that release. The container
# shares this machine's network (pip asks the index for missing wheels) and nothing else.
set -euo pipefail

if [ "$#" -ne 3 ]; then
  echo "usage: $0 RELEASE VERSION WHEEL_CACHE" >&2
  exit 2
fi
release=$1 version=$2 wheels=$3
root=$(cd "$(dirname "$0")/.." && pwd)
cache=/var/cache/vicifast-agent-build/roots
mirror=http://deb.debian.org/debian
# debian/control's Build-Depends, build-essential (implied by every Build-Depends) and the CA
# certificates pip needs to reach the index.
packages=build-essential,ca-certificates,debhelper,dpkg-dev,python3,python3-nftables,python3-systemd,python3-venv

if ! awk -v r="$release" '$1 == r { found = 1 } END { exit !found }' "$root/packaging/releases"; then
  echo "$0: no release '$release' in packaging/releases" >&2
  exit 2
fi
for tool in debootstrap systemd-nspawn flock; do
  command -v "$tool" >/dev/null || { echo "$0: needs $tool (make deb installs it)" >&2; exit 2; }
done

key=$(printf '%s\n' v1 "$release" "$mirror" "$packages" | sha256sum | cut -c1-12)
broot=$cache/$release-$key
mkdir -p "$cache" "$wheels"
(
  flock 9 # two builds at once make the root once
  if [ ! -e "$broot/etc/os-release" ]; then
    partial=$cache/.partial-$key
    rm -rf "$partial"
    echo "making the $release build root (debootstrap, once): $broot"
    if ! debootstrap --variant=minbase --include="$packages" "$release" "$partial" "$mirror" \
      >"$cache/debootstrap-$release.log" 2>&1; then
      tail -20 "$cache/debootstrap-$release.log" >&2
      echo "$0: debootstrap failed; full log: $cache/debootstrap-$release.log" >&2
      exit 1
    fi
    rm -rf "$partial/var/cache/apt/archives" "$partial/var/lib/apt/lists"
    mkdir -p "$partial/var/cache/apt/archives/partial" "$partial/var/lib/apt/lists/partial"
    mv "$partial" "$broot"
  fi
) 9>"$cache/.lock"

# pip inside trusts what this machine's pip trusts (a site's TLS-inspecting proxy has its CA in
# this machine's bundle, not in the fresh root's).
trust=()
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  trust=(--bind-ro=/etc/ssl/certs/ca-certificates.crt)
fi
# This machine's PID 1 need not be systemd: no machined registration, no transient scope.
exec systemd-nspawn --quiet --register=no --keep-unit --directory="$broot" \
  --volatile=overlay --bind="$root:/src" --bind="$wheels:/wheels" --chdir=/src "${trust[@]}" \
  --setenv=LANG=C.UTF-8 --setenv=HOME=/root --setenv=PIP_DISABLE_PIP_VERSION_CHECK=1 \
  /bin/sh -ec '
    /usr/bin/python3 -m venv /var/tmp/pip
    exec bash packaging/build-deb.sh /var/tmp/pip/bin/python "$1" /wheels "$2"
  ' sh "$version" "$release"
