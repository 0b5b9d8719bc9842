#!/usr/bin/env bash
# Build dist/vicifast-agent_<VERSION>_<arch>.deb with dpkg-buildpackage from a copy of the tree.
#
#   usage: packaging/build-deb.sh PYTHON VERSION WHEEL_CACHE     (make deb [VERSION=...])
#
# PYTHON has pip (the dev venv); it fills WHEEL_CACHE with every wheel the build needs (kept
# between builds; the index is asked only when a wheel is missing), then the package build runs
# offline from that cache. VERSION other than debian/changelog's top entry (a test's "newer
# build") gets its own changelog entry and __version__ in the copy; the repository is untouched.
set -euo pipefail

if [ "$#" -ne 3 ]; then
  echo "usage: $0 PYTHON VERSION WHEEL_CACHE" >&2
  exit 2
fi
python=$1 version=$2 wheels=$3
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

case "$version" in
  "" | *[!A-Za-z0-9.+~-]* | [!0-9]*) echo "$0: bad version '$version'" >&2; exit 2 ;;
esac

mkdir -p "$wheels"
download() {
  "$python" -m pip download -q --disable-pip-version-check --only-binary :all: -d "$wheels" \
    -r packaging/build-requirements.txt -c packaging/constraints.txt "$@"
}
if ! download --no-index --find-links "$wheels" >/dev/null 2>&1; then
  echo "fetching wheels into $wheels"
  download
fi

stage=$root/build/deb
src=$stage/vicifast-agent-$version
rm -rf "$stage"
mkdir -p "$src" dist
# The working tree as it is (new files too), without build output, caches or the dev venv.
tar -C "$root" -c \
  --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
  --exclude=./agent/rpc/pb --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
  --exclude='./.stamp-*' . | tar -C "$src" -x

top=$(dpkg-parsechangelog -l debian/changelog -S Version)
if [ "$version" != "$top" ]; then
  {
    printf 'vicifast-agent (%s) bookworm; urgency=medium\n\n' "$version"
    printf '  * Build %s of the working tree.\n\n' "$version"
    printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l debian/changelog -S Maintainer)" \
      "$(date -R)"
    cat debian/changelog
  } > "$src/debian/changelog"
  sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$src/agent/__init__.py"
fi

(cd "$src" && VICIFAST_WHEELS=$wheels dpkg-buildpackage -b -us -uc --no-sign -j1 >../build.log 2>&1) || {
  tail -40 "$stage/build.log" >&2
  echo "$0: dpkg-buildpackage failed; full log: $stage/build.log" >&2
  exit 1
}
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=vicifast-agent_${version}_${arch}.deb
mv "$stage/$deb" dist/
echo "dist/$deb"
