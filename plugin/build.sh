#!/usr/bin/env bash
# Build the managed-plugin directory from Debian packages (no registry needed):
#   plugin/dist/config.json + plugin/dist/rootfs/   (nothing else: dockerd receives the whole dir)
# and, unless NO_CREATE=1, `docker plugin create $PLUGIN_NAME:$VERSION plugin/dist`.
#
# The Debian base (mmdebstrap, custom variant: python3 + etcd-server) is cached as
# plugin/cache/base-<hash>.tar, keyed on the package list and the apt sources, so rebuilds only
# redo the pip step (~10 s) and the `docker plugin create` upload.
#
# Environment:
#   PLUGIN_NAME   default syncmesh/syncmesh-plugin
#   DOCKER        docker CLI command (default: docker; e.g. "docker -H unix:///run/docker1.sock")
#   SUITE         Debian suite, default bookworm (its python3 is 3.11, as the package needs)
#   MIRROR        apt sources for mmdebstrap: a deb822 .sources file or a mirror URL.
#                 Default: /etc/apt/sources.list.d/debian.sources if present, else http://deb.debian.org/debian
#   NO_CREATE=1   only build plugin/dist
#   PYTHON        python used to run pip (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PLUGIN_NAME=${PLUGIN_NAME:-syncmesh/syncmesh-plugin}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' syncmesh_plugin/__init__.py)
DOCKER=${DOCKER:-docker}
SUITE=${SUITE:-bookworm}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if [ -z "${MIRROR:-}" ]; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then MIRROR=/etc/apt/sources.list.d/debian.sources
  else MIRROR=http://deb.debian.org/debian; fi
fi
CACHE=$ROOT/plugin/cache
DIST=$ROOT/plugin/dist
# libc-bin: dpkg needs ldconfig (and ctypes.util.find_library uses `ldconfig -p`).
# libstdc++6: grpcio (etcd3aio) links against it.
PACKAGES=base-files,base-passwd,libc-bin,dash,coreutils,dpkg,diffutils,sed,grep,python3,libstdc++6
# The embedded single-host etcd (no SYNCMESH_ETCD_ENDPOINTS) runs `etcd` from PATH. Installing
# etcd-server as a package drags in adduser/passwd/perl/usrmerge (and failed in the custom
# variant), so only its static binary is unpacked from the Debian package into /usr/bin/etcd.
ETCD_HOOK='set -e; d=$(mktemp -d); cd "$d"; apt-get download -q etcd-server >/dev/null;
  dpkg-deb -x etcd-server_*.deb x; install -m 755 x/usr/bin/etcd "$1/usr/bin/etcd"; cd /; rm -rf "$d"'
t0=$(date +%s.%N)
say() { awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$*" 'BEGIN{printf "[plugin %6.1fs] %s\n", b-a, m}'; }

command -v mmdebstrap >/dev/null || { echo "mmdebstrap missing: apt-get install -y mmdebstrap" >&2; exit 1; }
mkdir -p "$CACHE"
key=$( { echo "$SUITE $PACKAGES etcd v2"; if [ -f "$MIRROR" ]; then cat "$MIRROR"; else echo "$MIRROR"; fi; } | sha256sum | cut -c1-16)
BASE=$CACHE/base-$key.tar
if [ ! -s "$BASE" ]; then
  say "building Debian base with mmdebstrap ($SUITE, custom variant) -> $BASE"
  mmdebstrap --quiet --variant=custom --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="$ETCD_HOOK" \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    "$SUITE" "$BASE.part.tar" "$MIRROR"   # the .tar suffix selects the tarball format
  mv "$BASE.part.tar" "$BASE"
  find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$key.tar" -delete   # stale bases
  say "base built ($(du -h "$BASE" | cut -f1))"
else
  say "using cached base $BASE"
fi

# The project's wheel plus its dependencies, installed for the rootfs's python3 (3.11, x86_64 glibc).
say "building wheel and installing it with its dependencies"
rm -rf "$CACHE/wheel" "$CACHE/site"
"$PYTHON" -m pip wheel -q --no-deps -w "$CACHE/wheel" "$ROOT" >"$CACHE/wheel.log" 2>&1 \
  || { cat "$CACHE/wheel.log" >&2; exit 1; }
rm -rf "$ROOT/build"   # setuptools' scratch dir
"$PYTHON" -m pip install -q --no-compile --target "$CACHE/site" \
  --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_36_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --only-binary=:all: "$CACHE"/wheel/syncmesh_plugin-*.whl 2> >(grep -v "is ignored: it is neither" >&2)

say "assembling $DIST"
rm -rf "$DIST"
mkdir -p "$DIST/rootfs"
tar -C "$DIST/rootfs" -xf "$BASE"
SITE=$DIST/rootfs/usr/local/lib/python3.11/dist-packages
mkdir -p "$SITE"
cp -a "$CACHE/site/." "$SITE/"
rm -rf "$SITE/bin"   # console scripts written for the build host's python; replaced below
cat > "$DIST/rootfs/usr/local/bin/syncmesh-plugin" <<'PY'
#!/usr/bin/python3
import sys

from syncmesh_plugin.cli import main

sys.exit(main())
PY
chmod 755 "$DIST/rootfs/usr/local/bin/syncmesh-plugin"
# The plugin socket dir must exist in the rootfs; the data root is the propagated mount;
# /etc/syncmesh receives the settable `config` bind mount (certificates, optional YAML config).
mkdir -p "$DIST/rootfs/run/docker/plugins" "$DIST/rootfs/var/lib/syncmesh" "$DIST/rootfs/etc/syncmesh"
touch "$DIST/rootfs/etc/hosts" "$DIST/rootfs/etc/resolv.conf"
# Byte-compile inside the rootfs's own interpreter layout is not possible without chroot; do it with chroot.
chroot "$DIST/rootfs" /usr/bin/python3 -m compileall -q /usr/local/lib/python3.11/dist-packages >/dev/null || true
chroot "$DIST/rootfs" /usr/bin/python3 -c 'import syncmesh_plugin.daemon, sqlite3, ssl, ctypes' \
  || { echo "rootfs python cannot import the daemon" >&2; exit 1; }
cp "$ROOT/config.json" "$DIST/config.json"
say "rootfs ready ($(du -sh "$DIST/rootfs" | cut -f1))"

if [ "${NO_CREATE:-0}" = 1 ]; then exit 0; fi
REF=$PLUGIN_NAME:$VERSION
if $DOCKER plugin inspect "$REF" >/dev/null 2>&1; then
  say "removing existing $REF"
  $DOCKER plugin rm -f "$REF" >/dev/null
fi
say "docker plugin create $REF"
$DOCKER plugin create "$REF" "$DIST" >/dev/null
say "created $REF (disabled; enable with: make plugin-enable)"
