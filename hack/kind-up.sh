#!/usr/bin/env bash
# For users with Docker: a kind cluster with ModelPilot's images, Prometheus and the chart.
# (The project's own tests use the Docker-free control plane in hack/cluster.sh.)
# Usage: hack/kind-up.sh [cluster-name]   Env: KIND_IMAGE (node image), TAG (image tag)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=${1:-modelpilot}
tag=${TAG:-dev}
images=(operator ingestion embedding retrieval inference triton)  # as hack/build-images.sh builds

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-up: $tool is required" >&2; exit 1; }
done

if ! kind get clusters | grep -qx "$name"; then
  kind create cluster --name "$name" ${KIND_IMAGE:+--image "$KIND_IMAGE"} --wait 120s
fi
kubectl config use-context "kind-$name"

make -C "$root" images IMAGE_REPOSITORY=modelpilot IMAGE_TAG="$tag"
for image in "${images[@]}"; do
  kind load docker-image --name "$name" "modelpilot/$image:$tag"
done

helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
helm upgrade --install prometheus prometheus-community/prometheus \
  --namespace monitoring --create-namespace --wait \
  --set alertmanager.enabled=false --set prometheus-pushgateway.enabled=false

helm upgrade --install modelpilot "$root/charts/modelpilot" \
  --namespace modelpilot-system --create-namespace --wait \
  --set image.repository=modelpilot/operator --set image.tag="$tag" \
  --set prometheus.url=http://prometheus-server.monitoring.svc \
  --set services.imageRepository=modelpilot --set services.imageTag="$tag"

echo "kind-up: ready. Try: kubectl apply -f $root/examples/minimal.yaml && kubectl get md -w"
