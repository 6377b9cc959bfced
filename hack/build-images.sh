#!/usr/bin/env bash
# Build the operator and service images with Docker or, without a Docker engine, Podman.
#
#   hack/build-images.sh              # every image, tagged $IMAGE_REPOSITORY/<name>:$IMAGE_TAG
#   hack/build-images.sh --smoke      # then run Triton + embedding from them and embed a text
#
# When the local cluster's real node runs (hack/node.sh), the images are loaded into it too.
#
# BASE_FROM_DEBIAN=1 builds the Debian bookworm base from Debian's package mirror
# (mmdebstrap) instead of pulling it, for machines that reach Debian and PyPI but no image
# registry. Podman builds see the host's CA bundle (for pip) and /etc/pip.conf, so they work
# behind a TLS-intercepting proxy; neither ends up in an image.
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=${IMAGE_REPOSITORY:-ghcr.io/modelpilot}  # the operator's defaults (render/children.py)
TAG=${IMAGE_TAG:-0.1.0}
SERVICES=(ingestion embedding retrieval inference triton)

cleanup=()
trap 'rm -f "${cleanup[@]}"' EXIT

if docker info >/dev/null 2>&1; then
  ENGINE=(docker)
  BUILD=(docker build)
elif command -v podman >/dev/null; then
  ENGINE=(podman)
  # chroot isolation: RUN steps need no OCI runtime, cgroups or rlimits from the host.
  BUILD=(podman build --isolation chroot --network host)
  ca=/etc/ssl/certs/ca-certificates.crt
  if [[ -f $ca ]]; then
    # The host's CA bundle at a path of its own, and a pip.conf pointing there: mounted at
    # its usual path it breaks the image's ca-certificates postinst, which replaces it.
    pipconf=$(mktemp --suffix=.conf)
    cleanup+=("$pipconf")
    printf '[global]\ncert = /run/host-ca.crt\n' >"$pipconf"
    if [[ -f /etc/pip.conf ]]; then
      grep -vE '^[[:space:]]*(\[global\]|cert[[:space:]]*=)' /etc/pip.conf >>"$pipconf" || true
    fi
    BUILD+=(-v "$ca:/run/host-ca.crt:ro" -v "$pipconf:/etc/pip.conf:ro")
  elif [[ -f /etc/pip.conf ]]; then
    BUILD+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  fi
else
  echo "build-images: neither a Docker engine (docker info failed) nor podman" >&2
  exit 1
fi

if [[ ${BASE_FROM_DEBIAN:-0} == 1 ]]; then
  base=localhost/modelpilot/debian:bookworm
  if ! "${ENGINE[@]}" image inspect "$base" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || { echo "build-images: BASE_FROM_DEBIAN needs mmdebstrap" >&2; exit 1; }
    rootfs=$(mktemp --suffix=.tar)
    cleanup+=("$rootfs")
    mmdebstrap --variant=minbase --quiet bookworm "$rootfs"
    "${ENGINE[@]}" import "$rootfs" "$base" >/dev/null
  fi
  BUILD+=(--build-arg "BASE=$base")
fi

"${BUILD[@]}" -f images/operator.Dockerfile -t "$REPO/operator:$TAG" .
for s in "${SERVICES[@]}"; do
  "${BUILD[@]}" -f images/services.Dockerfile --target "$s" -t "$REPO/$s:$TAG" .
done
echo "built: operator ${SERVICES[*]} as $REPO/<name>:$TAG"

# The local cluster's real node has no registry to pull from: hand it the images (each only
# when it changed), so pods with imagePullPolicy IfNotPresent start offline.
if [[ ${ENGINE[0]} == podman ]] && hack/node.sh status >/dev/null 2>&1; then
  images=("$REPO/operator:$TAG")
  for s in "${SERVICES[@]}"; do images+=("$REPO/$s:$TAG"); done
  hack/node.sh load "${images[@]}"
  echo "loaded into node-1: operator ${SERVICES[*]}"
fi

[[ ${1:-} == --smoke ]] || exit 0

# Smoke test: Triton from the triton image, the embedding service from its image, on the
# host network at spare ports; one text embedded through both.
RUN=("${ENGINE[@]}" run -d --rm --network host)
if [[ ${ENGINE[0]} == podman ]]; then
  # Podman asks for rlimits above what some sandboxes allow a container to set.
  RUN=(podman --runtime "$(command -v runc || command -v crun)" run -d --rm --network host
       --ulimit "nofile=$(ulimit -n):$(ulimit -n)" --ulimit "nproc=4096:4096")
fi
names=(modelpilot-smoke-triton modelpilot-smoke-embedding)
trap '"${ENGINE[@]}" rm -f "${names[@]}" >/dev/null 2>&1 || true; rm -f "${cleanup[@]}"' EXIT
"${RUN[@]}" --name "${names[0]}" "$REPO/triton:$TAG" --model-repository=/tmp/models \
  --model-control-mode=explicit --load-model=minilm_int8 --http-address=127.0.0.1 \
  --grpc-address=127.0.0.1 --http-port=18000 --grpc-port=18001 --metrics-port=18002 >/dev/null
"${RUN[@]}" --name "${names[1]}" -e PORT=18082 -e MODELPILOT_TRITON_URL=127.0.0.1:18000 \
  -e MODELPILOT_MODEL=minilm_int8 "$REPO/embedding:$TAG" >/dev/null
deadline=$((SECONDS + 180))
until curl -sf localhost:18082/readyz >/dev/null; do
  if ((SECONDS > deadline)); then
    "${ENGINE[@]}" logs "${names[1]}" >&2 || true
    echo "smoke: the embedding service was not ready in 180 s" >&2
    exit 1
  fi
  sleep 1
done
dims=$(curl -sf localhost:18082/v1/embed -H 'Content-Type: application/json' \
  -d '{"texts": ["hello from the images"]}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["dims"])')
batches=$(curl -sf localhost:18002/metrics | grep -c '^nv_inference_count' || true)
[[ $dims == 384 && $batches -ge 1 ]] || { echo "smoke: dims=$dims nv_inference_count series=$batches" >&2; exit 1; }
echo "smoke: Triton and the embedding service from the images embedded a text (384 dims)"
