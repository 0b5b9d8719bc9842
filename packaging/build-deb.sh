#!/usr/bin/env bash
# Build dist/vicifast-agent_<VERSION><suffix>_<arch>.deb with dpkg-buildpackage from a copy of
# the tree, on (and for) the Debian release this system runs.
#
#   usage: packaging/build-deb.sh PYTHON VERSION WHEEL_CACHE RELEASE   (make deb [VERSION=...])
#
# RELEASE is this system's codename (checked): the package is for that release only, and its
# version is VERSION plus the release's suffix from packaging/releases (0.1.0~deb13u1). A
# release other than the build machine's is built by packaging/build-in-root.sh, which runs this
# script inside a root of that release.
#
# PYTHON has pip (the dev venv); it fills WHEEL_CACHE with every wheel the build needs (kept
# between builds; the index is asked only when a wheel is missing), then the package build runs
# offline from that cache. Every build gets its own debian/changelog entry (release and suffix)
# in the copy, and a VERSION other than agent/__init__.py's (a test's "newer build") its
# __version__ there too; the repository is untouched.
set -euo pipefail

if [ "$#" -ne 4 ]; then
  echo "usage: $0 PYTHON VERSION WHEEL_CACHE RELEASE" >&2
  exit 2
fi
python=$1 version=$2 wheels=$3 release=$4
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

case "$version" in
  "" | *[!A-Za-z0-9.+]* | [!0-9]*) echo "$0: bad version '$version'" >&2; exit 2 ;;
esac
suffix=$(awk -v r="$release" '$1 == r { print $3 }' packaging/releases)
if [ -z "$suffix" ]; then
  echo "$0: no release '$release' in packaging/releases" >&2
  exit 2
fi
running=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$running" != "$release" ]; then
  echo "$0: this system runs '$running', not '$release': use packaging/build-in-root.sh" >&2
  exit 2
fi

mkdir -p "$wheels"
download() {
  "$python" -m pip download -q --disable-pip-version-check --only-binary :all: -d "$wheels" \
    -r packaging/build-requirements.txt -c packaging/constraints.txt "$@"
}
if ! download --no-index --find-links "$wheels" >/dev/null 2>&1; then
  echo "fetching wheels into $wheels"
  download
fi

stage=$root/build/deb-$release
src=$stage/vicifast-agent-$version
rm -rf "$stage"
mkdir -p "$src" dist
# The working tree as it is (new files too), without build output, caches or the dev venv.
tar -C "$root" -c \
  --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
  --exclude=./agent/rpc/pb --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
  --exclude='./.stamp-*' . | tar -C "$src" -x

{
  printf 'vicifast-agent (%s%s) %s; urgency=medium\n\n' "$version" "$suffix" "$release"
  printf '  * Build %s of the working tree for %s.\n\n' "$version" "$release"
  printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l debian/changelog -S Maintainer)" \
    "$(date -R)"
  cat debian/changelog
} > "$src/debian/changelog"
sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$src/agent/__init__.py"

(cd "$src" && VICIFAST_WHEELS=$wheels dpkg-buildpackage -b -us -uc --no-sign -j1 >../build.log 2>&1) || {
  tail -40 "$stage/build.log" >&2
  echo "$0: dpkg-buildpackage failed; full log: $stage/build.log" >&2
  exit 1
}
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=vicifast-agent_${version}${suffix}_${arch}.deb
mv "$stage/$deb" dist/
echo "dist/$deb"
