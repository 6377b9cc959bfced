# shellcheck shell=bash
# Shared by hack/cluster.sh and hack/node.sh: paths, ports, the node network, and helpers.
# Sourced, never run: the variables are the sourcing script's.
# shellcheck disable=SC2034

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="$root/.cache/cluster"
pki="$state/pki"
run="$state/run"
logs="$root/.cache/logs"
bin="$root/.cache/bin"
kubeconfig="$root/.cache/kubeconfig"
etcd_port=${MODELPILOT_ETCD_PORT:-23790}
api_port=${MODELPILOT_APISERVER_PORT:-16443}
kcm_port=${MODELPILOT_KCM_PORT:-20257}
sched_port=${MODELPILOT_SCHEDULER_PORT:-20259}
kwok_port=${MODELPILOT_KWOK_PORT:-20247}

# The real node's network, all of it on this machine. The bridge's own address is the node's
# IP (the kubelet refuses a loopback one, and this kernel has no dummy links); pods get
# addresses from pod_cidr on the bridge. kwok's fake pods take 10.244.0.0/16 (kwok --cidr),
# Services 10.96.0.0/16: none of the three overlap.
bridge=mpbr0
node_ip=10.245.0.1
pod_cidr=10.245.0.0/24
kwok_cidr=10.244.0.0/16
service_cidr=10.96.0.0/16
dns_service_ip=10.96.0.10

log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "$(basename "$0" .sh)" "$*" >&2; }
die() { log "$*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or the deadline passes.
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what (logs: $logs)"
    sleep 0.2
  done
}

alive() { [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

start() { # start NAME BINARY ARGS...: detach into its own session so the caller may exit.
  local name=$1
  shift
  alive "$name" && return 0
  setsid "$@" >"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$run/$name.pid"
}

stop() { # stop NAME...: SIGTERM, up to 15 s, then SIGKILL.
  local c pid
  for c in "$@"; do
    if [ -f "$run/$c.pid" ]; then kill "$(cat "$run/$c.pid")" 2>/dev/null || true; fi
  done
  for c in "$@"; do
    [ -f "$run/$c.pid" ] || continue
    pid=$(cat "$run/$c.pid")
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$run/$c.pid"
  done
}

kubectl_() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }

# report NAME...: each component's state; fails when one is stopped.
report() {
  local c rc=0
  for c in "$@"; do
    if alive "$c"; then echo "$c: running (pid $(cat "$run/$c.pid"))"; else echo "$c: stopped"; rc=1; fi
  done
  return $rc
}

# user_role USER RULE...: a ClusterRole of RULEs (flow-style YAML) bound to USER, the CN of
# a client certificate that hack/cluster.sh made; YAML documents on stdout.
user_role() {
  local user=$1 rule
  shift
  printf -- '---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n'
  printf -- 'metadata: {name: "%s"}\nrules:\n' "$user"
  for rule in "$@"; do printf -- '- %s\n' "$rule"; done
  printf -- '---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n'
  printf -- 'metadata: {name: "%s"}\n' "$user"
  printf -- 'roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "%s"}\n' "$user"
  printf -- 'subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "%s"}]\n' "$user"
}
