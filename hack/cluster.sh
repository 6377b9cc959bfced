#!/usr/bin/env bash
# A local Kubernetes control plane as plain processes: etcd, kube-apiserver (RBAC, TLS,
# service-account signing), kube-controller-manager, kube-scheduler, kwok with fake nodes,
# and one real node (hack/node.sh: containerd, kubelet, kube-proxy, DNS, storage).
# Usage: hack/cluster.sh up|down|status
# Env: MODELPILOT_ETCD_PORT (23790), MODELPILOT_APISERVER_PORT (16443),
#      MODELPILOT_KCM_PORT (20257), MODELPILOT_SCHEDULER_PORT (20259),
#      MODELPILOT_KWOK_PORT (20247); the node's in hack/node.sh
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

gen_cert() { # gen_cert NAME SUBJECT [SAN]: a key and a certificate signed by the local CA.
  local name=$1 subj=$2 san=${3:-}
  [ -f "$pki/$name.crt" ] && return 0
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  local ext="$pki/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

write_kubeconfig() { # write_kubeconfig FILE CERT_NAME
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: modelpilot-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: modelpilot-local
  context: {cluster: modelpilot-local, user: $2}
current-context: modelpilot-local
EOF
}

make_pki() {
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.crt" ]; then
    openssl genrsa -out "$pki/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=modelpilot-local-ca" -days 3650 \
      -out "$pki/ca.crt" 2>/dev/null
  fi
  # Pods reach the apiserver at kubernetes.default.svc (10.96.0.1), which kube-proxy maps to
  # the node IP it advertises.
  gen_cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:$node_ip,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  gen_cert admin "/O=system:masters/CN=modelpilot-admin"
  gen_cert kube-controller-manager "/CN=system:kube-controller-manager"
  gen_cert kube-scheduler "/CN=system:kube-scheduler"
  gen_cert kwok "/O=system:masters/CN=kwok"
  # The real node: the kubelet's identity (Node authorizer) and serving certificate in one,
  # the apiserver's client certificate for kubelets (logs, exec, port-forward), kube-proxy,
  # CoreDNS and local-path-provisioner, each with the RBAC that hack/node.sh applies.
  gen_cert kubelet "/O=system:nodes/CN=system:node:node-1" "IP:$node_ip,DNS:node-1"
  gen_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  gen_cert kube-proxy "/CN=system:kube-proxy"
  gen_cert coredns "/CN=modelpilot:coredns"
  gen_cert local-path "/CN=modelpilot:local-path-provisioner"
  gen_cert prometheus "/CN=modelpilot:prometheus"
  [ -f "$pki/sa.key" ] || openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  [ -f "$pki/sa.pub" ] || openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  write_kubeconfig "$state/admin.kubeconfig" admin
  write_kubeconfig "$state/kube-controller-manager.kubeconfig" kube-controller-manager
  write_kubeconfig "$state/kube-scheduler.kubeconfig" kube-scheduler
  write_kubeconfig "$state/kwok.kubeconfig" kwok
  local c
  for c in kubelet kube-proxy coredns local-path; do write_kubeconfig "$state/$c.kubeconfig" "$c"; done
}

apiserver_ready() {
  curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$api_port/readyz"
}

nodes_ready() {
  local ready
  ready=$(kubectl_ get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -c True)
  [ "$ready" -ge 3 ]
}

node_leases() {
  [ "$(kubectl_ get leases -n kube-node-lease -o name | grep -c kwok-)" -ge 3 ]
}

fake_node() { # fake_node NAME [extra capacity lines] [extra label lines]
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $1
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/role: agent
${3:-}
status:
  capacity: &cap
    cpu: "32"
    memory: 128Gi
    pods: "1000"
    ephemeral-storage: 500Gi
${2:-}
  allocatable: *cap
EOF
}

up() {
  for tool in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
    [ -x "$bin/$tool" ] || die "missing $bin/$tool: run 'make tools' (hack/build-tools.sh) first"
  done
  mkdir -p "$run" "$logs" "$state/etcd"
  local t0=$SECONDS
  make_pki
  cp "$state/admin.kubeconfig" "$kubeconfig"

  start etcd "$bin/etcd" --data-dir "$state/etcd" --name modelpilot \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-cluster "modelpilot=http://127.0.0.1:$((etcd_port + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for 30 etcd curl -fsS "http://127.0.0.1:$etcd_port/health"

  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 0.0.0.0 --advertise-address "$node_ip" --secure-port "$api_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$pki/ca.crt" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range "$service_cidr" --allow-privileged=true --profiling=false
  wait_for 90 kube-apiserver apiserver_ready

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$state/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$state/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$state/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials=true --controllers '*' \
    --enable-hostpath-provisioner=true \
    --concurrent-gc-syncs 10 --profiling=false
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$state/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$state/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$state/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false \
    --profiling=false
  local stage_args=()
  for f in "$bin"/stages/*.yaml; do stage_args+=(--config "$f"); done
  start kwok "$bin/kwok" --kubeconfig "$state/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-ip 10.244.0.1 --cidr "$kwok_cidr" \
    --node-lease-duration-seconds 40 \
    --server-address "127.0.0.1:$kwok_port" "${stage_args[@]}"

  {
    fake_node kwok-node-1
    fake_node kwok-node-2
    fake_node kwok-gpu-1 '    nvidia.com/gpu: "4"' \
      '    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3'
    # kwok pods' PVCs bind through the controller-manager's hostPath provisioner (the default
    # class); pods on the real node use local-path (hack/node.sh), which a non-root pod can write.
    cat <<EOF
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
    # hack/prometheus.sh discovers pods with this identity.
    user_role modelpilot:prometheus \
      '{apiGroups: [""], resources: [pods, services, endpoints, nodes], verbs: [get, list, watch]}'
  } | kubectl_ apply -f - >/dev/null
  wait_for 60 "3 Ready kwok nodes" nodes_ready
  wait_for 60 "kwok's node leases" node_leases
  wait_for 60 "the default ServiceAccount" kubectl_ get serviceaccount default -n default
  log "control plane up in $((SECONDS - t0))s"
  "$root/hack/node.sh" up
  log "cluster up in $((SECONDS - t0))s: export KUBECONFIG=$kubeconfig"
}

down() {
  # The node first: its pods' containers, mounts and network go while the apiserver answers.
  "$root/hack/node.sh" down
  stop "${components[@]}"
  # Fresh state next time: certificates are kept, cluster data is not.
  rm -rf "$state/etcd"
  log "control plane down"
}

status() {
  local rc=0
  report "${components[@]}" || rc=1
  "$root/hack/node.sh" status || rc=1
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: $0 up|down|status" ;;
esac
