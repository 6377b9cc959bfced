#!/usr/bin/env bash
# Build the pinned Go tools (control plane, etcd, kwok, helm) once per pin and link them into
# .cache/bin. Each hack/<module>/ is a wrapper Go module whose `tool` directives name what to
# build; its binaries are cached under $MODELPILOT_CACHE/<module>-<hash of go.mod, go.sum and
# the Go version>/, outside the clone, so fresh clones on the same machine (CI) reuse them and
# a pin change rebuilds only that module (this script is part of the key too).
# Usage: hack/build-tools.sh [module ...]   (default: all)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${MODELPILOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelpilot}
bin="$root/.cache/bin"
mkdir -p "$cache" "$bin"
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(controlplane etcd kwok helm)

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

for mod in "${modules[@]}"; do
  src="$root/hack/$mod"
  key=$( (cat "$src/go.mod" "$src/go.sum" "$0"; go version) | sha256sum | cut -c1-16)
  out="$cache/$mod-$key"
  if [ ! -f "$out/.complete" ]; then
    echo ">> building $mod (cold; cached afterwards in $out)"
    start=$(date +%s)
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    ldflags="-s -w"
    if [ "$mod" = controlplane ]; then ldflags=$(k8s_ldflags); fi
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out.tmp/" tool)
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
  for f in "$out"/*; do ln -sfn "$f" "$bin/$(basename "$f")"; done
  if [ "$mod" = etcd ]; then rm -f "$bin/server"; fi
done
