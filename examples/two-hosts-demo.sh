#!/usr/bin/env bash
# Two simulated hosts on one machine: a network namespace + dockerd + the syncmesh managed plugin
# each, one etcd on the bridge between them. A container on host 1 writes, a container on host 2
# reads the same bytes. Everything is removed on exit (also on error or Ctrl-C).
# The plugins run with their defaults: mutual TLS between them with the cluster's own CA. Host 1
# creates the CA; host 2 gets the join token host 1 prints (the one step besides the usual settings).
#
#   sudo examples/two-hosts-demo.sh            (KEEP=1 leaves it running until Enter is pressed)
#
# Needs root, docker.io, etcd-server, busybox-static, iproute2, iptables, mmdebstrap (for
# plugin/build.sh). Uses 10.231.78.0/24, a bridge `smdemobr`, namespaces smdemo1/smdemo2.
# Managed plugins, not the legacy socket: every dockerd scans the same /run/docker/plugins/*.sock,
# so a legacy plugin per simulated host would need a private mount namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
NET=10.231.78
BR=smdemobr
D=$(mktemp -d /tmp/smdemo.XXXXXX)
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' syncmesh_plugin/__init__.py)
REF=syncmesh/syncmesh-plugin:$VERSION
ETCD_PORT=23790
RULE=(FORWARD -i $BR -o $BR -m comment --comment syncmesh-demo -j ACCEPT)
t0=$(date +%s.%N)
say() { awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$*" 'BEGIN{printf "[demo %5.1fs] %s\n", b-a, m}'; }
dk() { local n=$1; shift; docker -H "unix://$D/h$n/docker.sock" "$@"; }

cleanup() {
  set +e
  say "cleaning up"
  for n in 1 2; do
    if [ -S "$D/h$n/docker.sock" ]; then
      ids=$(dk $n ps -aq 2>/dev/null); [ -n "$ids" ] && dk $n rm -f $ids >/dev/null 2>&1
      dk $n volume rm -f demo >/dev/null 2>&1
      dk $n plugin disable -f "$REF" >/dev/null 2>&1
    fi
    [ -f "$D/h$n/docker.pid" ] && kill "$(cat "$D/h$n/docker.pid")" 2>/dev/null
  done
  for n in 1 2; do
    for _ in $(seq 60); do [ -f "$D/h$n/docker.pid" ] && kill -0 "$(cat "$D/h$n/docker.pid")" 2>/dev/null || break; sleep 0.5; done
  done
  [ -f "$D/etcd.pid" ] && kill "$(cat "$D/etcd.pid")" 2>/dev/null
  iptables -D "${RULE[@]}" 2>/dev/null
  ip netns del smdemo1 2>/dev/null; ip netns del smdemo2 2>/dev/null; ip link del $BR 2>/dev/null
  grep -o " $D[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  sleep 1; rm -rf "$D"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
say "building the plugin directory (plugin/build.sh, cached Debian base)"
NO_CREATE=1 plugin/build.sh | tail -1

say "network: bridge $BR ($NET.1) + namespaces smdemo1 ($NET.11), smdemo2 ($NET.12)"
ip link add $BR type bridge; ip addr add $NET.1/24 dev $BR; ip link set $BR up
for n in 1 2; do
  ip netns add smdemo$n
  ip link add smdemo${n}v type veth peer name smdemo${n}c
  ip link set smdemo${n}c netns smdemo$n; ip link set smdemo${n}v master $BR up
  ip -n smdemo$n link set lo up; ip -n smdemo$n addr add $NET.1$n/24 dev smdemo${n}c; ip -n smdemo$n link set smdemo${n}c up
done
iptables -I "${RULE[0]}" 1 "${RULE[@]:1}"   # namespace-to-namespace traffic crosses FORWARD

say "etcd on $NET.1:$ETCD_PORT"
setsid etcd --name demo --data-dir "$D/etcd" --listen-client-urls "http://$NET.1:$ETCD_PORT" \
  --advertise-client-urls "http://$NET.1:$ETCD_PORT" --listen-peer-urls http://127.0.0.1:23800 \
  --initial-advertise-peer-urls http://127.0.0.1:23800 --initial-cluster demo=http://127.0.0.1:23800 \
  >"$D/etcd.log" 2>&1 </dev/null & echo $! >"$D/etcd.pid"

mkdir -p "$D/bb/bin" "$D/bb/tmp"; cp "$(command -v busybox)" "$D/bb/bin/"
(cd "$D/bb/bin" && for a in $(./busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$a"; done)
for n in 1 2; do
  mkdir -p "$D/h$n"; echo '{}' >"$D/h$n/daemon.json"
  # nsenter --net, not `ip netns exec` (that one remounts /sys and dockerd loses the cgroup mounts)
  setsid nsenter --net=/run/netns/smdemo$n dockerd --config-file "$D/h$n/daemon.json" --data-root "$D/h$n/data" \
    --exec-root "$D/h$n/exec" --pidfile "$D/h$n/docker.pid" -H "unix://$D/h$n/docker.sock" \
    --bridge=none --iptables=false --ip-masq=false >"$D/h$n/dockerd.log" 2>&1 </dev/null &
done
# a plugin's data root as the host sees it (the propagated mount under that dockerd's data root)
pki() { local f; for f in "$D"/h$1/data/plugins/*/propagated-mount/pki/$2; do [ -e "$f" ] && echo "$f"; done; }
TOKEN=
for n in 1 2; do
  for _ in $(seq 100); do dk $n version >/dev/null 2>&1 && break; sleep 0.2; done
  tar -C "$D/bb" -c . | dk $n import -c 'ENV PATH=/bin' - demo/busybox >/dev/null
  say "host$n: dockerd up; docker plugin create $REF"
  dk $n plugin create "$REF" plugin/dist >/dev/null
  dk $n plugin set "$REF" SYNCMESH_ETCD_ENDPOINTS=http://$NET.1:$ETCD_PORT SYNCMESH_NODE_ID=host$n \
    SYNCMESH_SERVER_ADVERTISE=$NET.1$n:7734 SYNCMESH_LOG_FORMAT=text ${TOKEN:+SYNCMESH_JOIN_TOKEN=$TOKEN}
  dk $n plugin enable "$REF" >/dev/null
  if [ $n = 1 ]; then
    # host 1 created the cluster CA; its join token is what `syncmesh-plugin token` prints on host 1 (as root;
    # the CLI finds a managed plugin's data root under /var/lib/docker/plugins by itself)
    for _ in $(seq 150); do [ -n "$(pki 1 join-token)" ] && break; sleep 0.2; done
    TOKEN=$(cat "$(pki 1 join-token)")
    say "host1: join token ${TOKEN:0:12}... (host 2 gets it as SYNCMESH_JOIN_TOKEN)"
  fi
done
for n in 1 2; do  # the node API answers over HTTPS on the bridge once the node has its certificate
  for _ in $(seq 150); do [ -n "$(pki $n trust.pem)" ] && python3 - "$NET.1$n" "$(pki $n trust.pem)" <<'PY' && break; sleep 0.2; done
import json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])  # the cluster's CA, from the node's data root
ctx.check_hostname = False  # every member's certificate is of that CA; addresses are not checked
url = f"https://{sys.argv[1]}:7734/api/v1/health"
h = json.load(urllib.request.urlopen(url, timeout=2, context=ctx))
sys.exit(0 if h["components"]["etcd"]["ok"] and h["components"]["tls"]["mode"] == "auto" else 1)
PY
done
say "both plugins connected to etcd, peers over mutual TLS with the cluster's CA"

dk 1 volume create -d "$REF" --opt conflict_resolution=size demo >/dev/null
say "host1: writing into volume demo"
dk 1 run --rm -v demo:/data demo/busybox sh -c 'echo "hello from host1 at $(date)" > /data/hello.txt; head -c 1000000 /dev/urandom > /data/blob; sha256sum /data/*'
say "host2: reading volume demo"
dk 2 run --rm -v demo:/data demo/busybox sh -c 'cat /data/hello.txt; sha256sum /data/*'
dk 2 volume inspect -f 'host2 status: {{json .Status.sync}}' demo
if [ "${KEEP:-0}" = 1 ]; then
  echo "running: docker -H unix://$D/h1/docker.sock ... / unix://$D/h2/docker.sock; press Enter to tear down"
  read -r _
fi
say "done"
