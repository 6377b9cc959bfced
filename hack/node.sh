#!/usr/bin/env bash
# The local cluster's real node, node-1: containerd, kubelet and kube-proxy on this machine,
# a bridge CNI for pod networking, CoreDNS for cluster.local and local-path-provisioner for
# PVCs. Pods on node-1 run real containers from images loaded into its containerd (no
# registry). node-1 is tainted modelpilot.io/real-node=true:NoSchedule, so only pods that
# tolerate it land there; kwok's fake nodes take the rest.
#
# Usage: hack/node.sh up|down|status          (hack/cluster.sh calls up and down)
#        hack/node.sh load IMAGE...           podman image -> node-1's containerd, if changed
#        hack/node.sh crictl ARGS...          crictl against node-1's containerd
# Env: MODELPILOT_NODE_PORTS (20250-20256), MODELPILOT_NODE_DIR (/var/lib/modelpilot-node: images
#      and volumes; the images survive `down`, like a node's image store)
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

node="node-1"
# Seven ports in a row from MODELPILOT_NODE_PORTS: the kubelet's, then the loopback-only
# health and metrics ports of the kubelet, kube-proxy and CoreDNS.
kubelet_port=${MODELPILOT_NODE_PORTS:-20250}
kubelet_healthz_port=$((kubelet_port + 1))
proxy_metrics_port=$((kubelet_port + 2))
proxy_healthz_port=$((kubelet_port + 3))
dns_health_port=$((kubelet_port + 4))
dns_ready_port=$((kubelet_port + 5))
dns_metrics_port=$((kubelet_port + 6))
node_dir=${MODELPILOT_NODE_DIR:-/var/lib/modelpilot-node}
node_run=/run/modelpilot-node
conf="$state/node"
sock="$node_run/containerd.sock"
taint=modelpilot.io/real-node
# Local images that the node's own machinery needs: the pod sandbox ("pause") and a busybox
# for local-path-provisioner's helper pods (and for tests). Both are made from Debian's
# busybox-static by `load_base_images`.
busybox_image=localhost/modelpilot/busybox:1.35
pause_image=localhost/modelpilot/pause:1.35
node_components=(local-path coredns kube-proxy kubelet containerd)

crictl_() { "$bin/crictl" --runtime-endpoint "unix://$sock" --image-endpoint "unix://$sock" "$@"; }
ctr_() { "$bin/ctr" --address "$sock" --namespace k8s.io "$@"; }

# ------------------------------------------------------------------------------- network
net_up() {
  # Routing between pods, and pods to Services, goes through this machine's own iptables.
  sysctl -qw net.ipv4.ip_forward=1
  # Replies from a Service's backend to a client on the same bridge must pass iptables to be
  # un-NATed; without this they skip it and the client drops them.
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    ip addr add "$node_ip/${pod_cidr#*/}" dev "$bridge"
  fi
  ip link set "$bridge" up
  # kwok's pods have fake addresses with no host behind them: no packet to one may follow
  # the default route out of this machine.
  ip route replace blackhole "$kwok_cidr"
  # A ClusterIP that kube-proxy has no rule for stays on the bridge too (unanswered), instead
  # of leaving by the default route. Host traffic to ClusterIPs leaves from the node IP.
  ip route replace "$service_cidr" dev "$bridge" src "$node_ip"
}

net_down() {
  ip route del blackhole "$kwok_cidr" 2>/dev/null || true
  ip route del "$service_cidr" dev "$bridge" 2>/dev/null || true
  ip link del "$bridge" 2>/dev/null || true
  # Chains the kubelet (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT), kube-proxy
  # and the CNI plugins (CNI-*) left, in both families, with every rule that jumps to them.
  local ipt table
  for ipt in iptables ip6tables; do
    for table in filter nat mangle; do
      if "$ipt-save" -t "$table" 2>/dev/null | grep -qE '(KUBE|CNI)-'; then
        "$ipt-save" -t "$table" | grep -vE '^:(KUBE|CNI)-|-A (KUBE|CNI)-|-j (KUBE|CNI)-' |
          "$ipt-restore" -T "$table"
      fi
    done
  done
}

# ---------------------------------------------------------------------------- containerd
write_containerd_config() {
  mkdir -p "$conf/cni" "$node_dir" "$node_run"
  cat >"$conf/containerd.toml" <<EOF
version = 3
root = "$node_dir/containerd"
state = "$node_run/containerd"
# NRI would open a socket under /var/run/nri; nothing here uses it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "$sock"

[plugins.'io.containerd.internal.v1.opt']
  path = "$node_dir/opt"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    # No registry: the sandbox image is one we build and import ourselves.
    sandbox = "$pause_image"

[plugins.'io.containerd.cri.v1.runtime']
  # runc cannot lower oom_score_adj here (no CAP_SYS_RESOURCE) and the CRI asks -998 for
  # every sandbox; without this each one fails "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Network namespaces under our state dir, not /run/netns, so that down finds them all.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        # cgroup v1 without systemd here: the kubelet uses the cgroupfs driver too.
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$bin/cni"]
    conf_dir = "$conf/cni"

[plugins.'io.containerd.grpc.v1.cri']
  # exec, attach and port-forward streams: loopback only, on a port of the kernel's choosing.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  # The pod network: one bridge on this machine, addresses from pod_cidr.
  cat >"$conf/cni/10-modelpilot.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "modelpilot",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node_run/cni-ipam",
        "ranges": [[{"subnet": "$pod_cidr", "gateway": "$node_ip"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# --------------------------------------------------------------------------------- images
# load IMAGE...: copy podman images into the node's containerd (namespace k8s.io), only those
# whose podman image ID differs from the one loaded last (stamps under $node_dir/loaded). One
# archive for all of them, so that the layers they share are written and imported once.
load() {
  local image id stamp tar todo=() ids=()
  mkdir -p "$node_dir/loaded"
  for image in "$@"; do
    id=$(podman image inspect --format '{{.Id}}' "$image")
    stamp="$node_dir/loaded/$(printf '%s' "$image" | tr '/:' '__')"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$id" ] && ctr_ images ls -q "name==$image" 2>/dev/null | grep -q .; then
      continue
    fi
    todo+=("$image") ids+=("$id")
  done
  [ ${#todo[@]} -gt 0 ] || return 0
  local t0=$SECONDS i
  tar=$(mktemp -p "$node_dir" --suffix=.tar)
  podman save --quiet --multi-image-archive --format docker-archive -o "$tar" "${todo[@]}"
  # (ctr warns on stderr that cgroup v1 is deprecated; errors still fail the import.)
  ctr_ images import "$tar" >/dev/null 2>>"$logs/ctr.log"
  rm -f "$tar"
  for i in "${!todo[@]}"; do
    echo "${ids[$i]}" >"$node_dir/loaded/$(printf '%s' "${todo[$i]}" | tr '/:' '__')"
  done
  log "loaded ${todo[*]} into $node in $((SECONDS - t0))s"
}

load_base_images() {
  if ! podman image exists "$busybox_image" || ! podman image exists "$pause_image"; then
    local ctx applet
    ctx=$(mktemp -d)
    mkdir "$ctx/bin"
    cp /bin/busybox "$ctx/bin/busybox"
    for applet in $(/bin/busybox --list); do
      [ "$applet" = busybox ] || ln -s busybox "$ctx/bin/$applet"
    done
    # /tmp as any image has it: world-writable (and sticky) for non-root pods.
    printf '%s\n' 'FROM scratch' 'COPY bin /bin' 'RUN ["/bin/busybox", "mkdir", "-m", "1777", "/tmp"]' \
      'ENV PATH=/bin' 'CMD ["/bin/sh"]' >"$ctx/Containerfile"
    podman build --quiet --isolation chroot -t "$busybox_image" "$ctx" >/dev/null
    # The sandbox only has to hold the pod's namespaces open.
    printf 'FROM %s\nCMD ["/bin/sleep", "2147483647"]\n' "$busybox_image" >"$ctx/Containerfile"
    podman build --quiet --isolation chroot -t "$pause_image" "$ctx" >/dev/null
    rm -rf "$ctx"
  fi
  load "$busybox_image" "$pause_image"
}

# -------------------------------------------------------------------------------- kubelet
write_kubelet_config() {
  cat >"$conf/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$sock
clusterDomain: cluster.local
clusterDNS: [$dns_service_ip]
podLogsDir: $node_dir/pod-logs
registerWithTaints:
- {key: $taint, value: "true", effect: NoSchedule}
# This machine runs cgroup v1, which kubelet 1.35+ refuses unless told otherwise.
failCgroupV1: false
# No systemd manages cgroups here.
cgroupDriver: cgroupfs
# Per-QoS parent cgroups and node allocatable enforcement need cgroup hierarchies this
# sandbox does not let the kubelet create; container limits are still set by runc.
cgroupsPerQOS: false
enforceNodeAllocatable: []
# The machine may have swap; pods here get none of it either way (LimitedSwap is opt-in).
failSwapOn: false
# Evict only when truly out of room: the machine is shared with the build caches.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
EOF
}

# ----------------------------------------------------------------------------------- DNS
write_corefile() {
  cat >"$conf/Corefile" <<EOF
.:53 {
    bind $node_ip
    errors
    health 127.0.0.1:$dns_health_port
    ready 127.0.0.1:$dns_ready_port
    prometheus 127.0.0.1:$dns_metrics_port
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $state/coredns.kubeconfig modelpilot-local
        pods insecure
        ttl 5
    }
    cache 5
    loadbalance
}
EOF
}

# The cluster objects the node's add-ons need: RBAC for CoreDNS and the provisioner, the
# kube-dns Service (its endpoint is CoreDNS on the node IP) and the local-path StorageClass.
apply_addons() {
  {
    user_role modelpilot:coredns \
      '{apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}' \
      '{apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}'
    user_role modelpilot:local-path-provisioner \
      '{apiGroups: [""], resources: [nodes, persistentvolumeclaims, configmaps, pods, pods/log], verbs: [get, list, watch]}' \
      '{apiGroups: [""], resources: [persistentvolumes], verbs: [get, list, watch, create, patch, update, delete]}' \
      '{apiGroups: [""], resources: [persistentvolumeclaims], verbs: [update, patch]}' \
      '{apiGroups: [""], resources: [events], verbs: [create, patch]}' \
      '{apiGroups: [storage.k8s.io], resources: [storageclasses], verbs: [get, list, watch]}'
    cat <<EOF
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $dns_service_ip
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node-1
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: modelpilot-node}
addressType: IPv4
endpoints: [{addresses: ["$node_ip"], conditions: {ready: true}, nodeName: $node}]
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Namespace
metadata: {name: local-path-storage}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: local-path-provisioner, namespace: local-path-storage}
---
# Its helper pods (which create and remove the volume directories) live in its namespace.
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: "modelpilot:local-path-provisioner", namespace: local-path-storage}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "modelpilot:local-path-provisioner"}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: local-path-config, namespace: local-path-storage}
data:
  config.json: |-
    {"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["$node_dir/local-path"]}]}
  # 0777 directories, as the provisioner ships them: a pod of any uid can write its volume.
  setup: |-
    #!/bin/sh
    set -eu
    mkdir -m 0777 -p "\$VOL_DIR"
  teardown: |-
    #!/bin/sh
    set -eu
    rm -rf "\$VOL_DIR"
  helperPod.yaml: |-
    apiVersion: v1
    kind: Pod
    metadata: {name: helper-pod}
    spec:
      tolerations: [{operator: Exists}]
      containers:
      - {name: helper-pod, image: $busybox_image, imagePullPolicy: Never}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: local-path}
provisioner: rancher.io/local-path
reclaimPolicy: Delete
# A volume is made on the node its first pod lands on.
volumeBindingMode: WaitForFirstConsumer
EOF
  } | kubectl_ apply --server-side --force-conflicts --field-manager modelpilot-node -f - >/dev/null
}

node_ready() {
  [ "$(kubectl_ get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

up() {
  for tool in containerd containerd-shim-runc-v2 ctr crictl kubelet kube-proxy coredns \
    local-path-provisioner cni/bridge; do
    [ -x "$bin/$tool" ] || die "missing $bin/$tool: run 'make tools' (hack/build-tools.sh) first"
  done
  command -v runc >/dev/null || die "runc not found: apt-get install runc (make apt)"
  command -v podman >/dev/null || die "podman not found: apt-get install podman (make apt)"
  local t0=$SECONDS
  mkdir -p "$run" "$logs" "$conf" "$node_dir/pod-logs" "$node_dir/local-path"
  net_up
  write_containerd_config
  write_kubelet_config
  write_corefile
  # containerd finds its shim on PATH.
  PATH="$bin:$PATH" start containerd "$bin/containerd" --config "$conf/containerd.toml"
  wait_for 60 containerd "$bin/ctr" --address "$sock" version
  load_base_images
  apply_addons

  start kubelet "$bin/kubelet" --config "$conf/kubelet.yaml" \
    --kubeconfig "$state/kubelet.kubeconfig" --root-dir "$node_dir/kubelet" \
    --cert-dir "$node_dir/kubelet/pki" --hostname-override "$node" --node-ip "$node_ip" \
    --node-labels "$taint=true"
  # NodePorts only on the node IP (never this machine's other interfaces), and no
  # route_localnet or conntrack sysctls: this machine's are not ours to change.
  start kube-proxy "$bin/kube-proxy" --kubeconfig "$state/kube-proxy.kubeconfig" \
    --hostname-override "$node" --proxy-mode iptables --cluster-cidr "$pod_cidr" \
    --nodeport-addresses "$node_ip/32" --iptables-localhost-nodeports=false \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 \
    --conntrack-tcp-timeout-close-wait 0 \
    --metrics-bind-address "127.0.0.1:$proxy_metrics_port" \
    --healthz-bind-address "127.0.0.1:$proxy_healthz_port"
  start coredns "$bin/coredns" -conf "$conf/Corefile"
  start local-path "$bin/local-path-provisioner" start \
    --kubeconfig "$state/local-path.kubeconfig" --namespace local-path-storage \
    --provisioner-name rancher.io/local-path --configmap-name local-path-config \
    --service-account-name local-path-provisioner --helper-image "$busybox_image"

  wait_for 120 "$node Ready" node_ready
  wait_for 60 "CoreDNS ready" curl -fsS "http://127.0.0.1:$dns_ready_port/ready"
  wait_for 60 "kube-proxy healthy" curl -fsS "http://127.0.0.1:$proxy_healthz_port/healthz"
  log "$node up in $((SECONDS - t0))s"
}

down() {
  stop local-path coredns kube-proxy kubelet
  if alive containerd; then
    # Every pod sandbox, stopped and removed through the CRI: that also runs the CNI's DEL,
    # which removes each pod's veth, address and port mappings.
    crictl_ rmp --all --force >/dev/null 2>&1 || true
  fi
  stop containerd
  # Shims of containers that outlived containerd.
  pkill -9 -f "containerd-shim-runc-v2 .*-address $sock" 2>/dev/null || true
  "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
  # Mounts the kubelet and containerd made: volumes, projected tokens, root filesystems,
  # network namespaces, and the kubelet's bind mount of its own root dir.
  local mnt
  for _ in 1 2 3; do
    while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done < <(
      awk -v a="$node_dir/" -v b="$node_run/" \
        'index($2, a) == 1 || index($2, b) == 1 || $2 == substr(a, 1, length(a) - 1) {print $2}' \
        /proc/self/mounts | sort -r)
  done
  net_down
  rm -rf "$node_run" "$node_dir/kubelet" "$node_dir/pod-logs" "$node_dir/local-path"
  # The kubelet links each container's log into /var/log/containers (a fixed path).
  find /var/log/containers -maxdepth 1 -type l -lname "$node_dir/*" -delete 2>/dev/null || true
  log "$node down"
}

status() { report "${node_components[@]}"; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  load) shift && load "$@" ;;
  crictl) shift && crictl_ "$@" ;;
  *) die "usage: $0 up|down|status|load IMAGE...|crictl ARGS..." ;;
esac
