#!/usr/bin/env bash
# Build the pinned Go tools once per pin and link them into .cache/bin: the control plane and
# the real node's kubelet and kube-proxy (controlplane), etcd, kwok, helm, and the node's
# runtime: containerd, the CNI plugins, crictl, CoreDNS and local-path-provisioner; and
# Prometheus (Debian's lacks Kubernetes service discovery). Each hack/<module>/ is a
# wrapper Go module whose `tool` directives name what to build; its binaries are cached
# under $MODELPILOT_CACHE/<module>-<hash of go.mod, go.sum and the Go version>/, outside the
# clone, so fresh clones on the same machine (CI) reuse them and
# a pin change rebuilds only that module (this script is part of the key too).
# Usage: hack/build-tools.sh [module ...]   (default: all)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${MODELPILOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelpilot}
bin="$root/.cache/bin"
mkdir -p "$cache" "$bin"
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(controlplane etcd kwok helm containerd cni cri-tools coredns local-path prometheus)

k8s_ldflags() {
  local v major minor
  v=$(go -C "$root/hack/controlplane" list -m -f '{{.Version}}' k8s.io/kubernetes)
  major=${v#v}; major=${major%%.*}
  minor=${v#v*.}; minor=${minor%%.*}
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

# Helm's release builds stamp its version and the Kubernetes minor it was built against
# (major + 1, minor of client-go v0.X); unstamped, helm reports v1.20.0 and a chart's
# kubeVersion constraint fails in `helm template`.
helm_ldflags() {
  local v client minor flags="-s -w"
  v=$(go -C "$root/hack/helm" list -m -f '{{.Version}}' helm.sh/helm/v3)
  client=$(go -C "$root/hack/helm" list -m -f '{{.Version}}' k8s.io/client-go)
  minor=${client#v0.}; minor=${minor%%.*}
  flags+=" -X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  echo "$flags"
}

for mod in "${modules[@]}"; do
  src="$root/hack/$mod"
  key=$( (cat "$src/go.mod" "$src/go.sum" "$src"/*.go "$0" 2>/dev/null; go version) | sha256sum | cut -c1-16)
  out="$cache/$mod-$key"
  if [ ! -f "$out/.complete" ]; then
    echo ">> building $mod (cold; cached afterwards in $out)"
    start=$(date +%s)
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    ldflags="-s -w" target=tool tags=""
    case $mod in
      controlplane) ldflags=$(k8s_ldflags) ;;
      helm) ldflags=$(helm_ldflags) ;;
      coredns) target=. ;;
      prometheus)
        # Module v0.3XX.Y is Prometheus v3.XX.Y. Of the optional service discoveries only
        # Kubernetes' (file and http are always in); the web UI is left out, the API is not.
        v=$(go -C "$src" list -m -f '{{.Version}}' github.com/prometheus/prometheus)
        v=${v#v0.}
        ldflags+=" -X github.com/prometheus/common/version.Version=${v:0:1}.$((10#${v:1:2})).${v#*.}"
        tags="remove_all_sd enable_kubernetes_sd"
        ;;
    esac
    # Static binaries; nice so that a cold build leaves the machine usable.
    (cd "$src" && CGO_ENABLED=0 nice go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out.tmp/" $target)
    # etcd's main package is go.etcd.io/etcd/server/v3, so the binary comes out as "server".
    if [ "$mod" = etcd ]; then mv "$out.tmp/server" "$out.tmp/etcd"; fi
    if [ "$mod" = kwok ]; then
      # kwok >= 0.8 ships no built-in stages: keep the fast node/pod stages from its module.
      kdir=$(cd "$src" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
      mkdir -p "$out.tmp/stages"
      for stage in node/fast node/heartbeat-with-lease pod/fast; do
        find "$kdir/kustomize/stage/$stage" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml \
          -exec cp {} "$out.tmp/stages/" \;
      done
      chmod u+w "$out.tmp/stages"/*
    fi
    touch "$out.tmp/.complete"
    rm -rf "$out" && mv "$out.tmp" "$out"
    # Drop builds of superseded pins of this module.
    find "$cache" -maxdepth 1 -name "$mod-*" ! -name "$mod-$key" -exec rm -rf {} +
    echo ">> built $mod in $(( $(date +%s) - start ))s"
  fi
  # The CNI plugins (bridge, loopback, ...) get a folder of their own, containerd's cni bin_dir.
  dest=$bin
  if [ "$mod" = cni ]; then dest=$bin/cni && mkdir -p "$dest"; fi
  for f in "$out"/*; do ln -sfn "$f" "$dest/$(basename "$f")"; done
  if [ "$mod" = etcd ]; then rm -f "$bin/server"; fi
done
