#!/usr/bin/env bash
# Prometheus (our pinned build: hack/prometheus, hack/build-tools.sh) as a local process. It finds the local cluster's pods the way a
# cluster's Prometheus does: Kubernetes service discovery (role pod) against the local
# apiserver, pods opting in with the prometheus.io/scrape|port|path annotations. Processes
# outside the cluster are targets by file-based discovery: drop a JSON file into
# .cache/prometheus/targets/ and it is picked up within seconds, no restart.
# It listens on all addresses so that pods reach it at the node IP (hack/lib.sh).
# Usage: hack/prometheus.sh up|down|status    (up on a running one rewrites and reloads it)
# Env: MODELPILOT_PROMETHEUS_PORT (19090), MODELPILOT_SCRAPE_INTERVAL (2s),
#      MODELPILOT_PROMETHEUS_DIR (.cache/prometheus: config, targets, data, pid)
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
dir=${MODELPILOT_PROMETHEUS_DIR:-$root/.cache/prometheus}
port=${MODELPILOT_PROMETHEUS_PORT:-19090}
interval=${MODELPILOT_SCRAPE_INTERVAL:-2s}
pidfile="$dir/prometheus.pid"

write_config() {
  cat <<EOF
global:
  scrape_interval: $interval
  evaluation_interval: $interval
# Prometheus 3 refuses a scrape without a known Content-Type unless told what to assume.
scrape_configs:
  - job_name: prometheus
    fallback_scrape_protocol: PrometheusText0.0.4
    static_configs: [{targets: ["127.0.0.1:$port"]}]
  - job_name: modelpilot
    fallback_scrape_protocol: PrometheusText0.0.4
    file_sd_configs:
      - files: ["$dir/targets/*.json"]
        refresh_interval: 2s
EOF
  # The cluster's pods, once the cluster has made credentials for us (hack/cluster.sh).
  [ -f "$pki/prometheus.crt" ] || return 0
  cat <<EOF
  - job_name: kubernetes-pods
    fallback_scrape_protocol: PrometheusText0.0.4
    kubernetes_sd_configs:
      - role: pod
        api_server: https://127.0.0.1:$api_port
        tls_config: {ca_file: $pki/ca.crt, cert_file: $pki/prometheus.crt, key_file: $pki/prometheus.key}
    relabel_configs:
      - {source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], regex: "true", action: keep}
      # kwok's pods have fake addresses with no process behind them.
      - {source_labels: [__meta_kubernetes_pod_node_name], regex: "kwok-.*", action: drop}
      - {source_labels: [__meta_kubernetes_pod_phase], regex: "Pending|Succeeded|Failed", action: drop}
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        regex: '([^:]+)(?::\d+)?;(\d+)'
        replacement: '\$1:\$2'
        target_label: __address__
      - {source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path], regex: "(.+)", target_label: __metrics_path__}
      - {action: labelmap, regex: __meta_kubernetes_pod_label_(.+)}
      - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
      - {source_labels: [__meta_kubernetes_pod_node_name], target_label: node}
EOF
}

up() {
  [ -x "$bin/prometheus" ] || die "missing $bin/prometheus: run 'make tools' (hack/build-tools.sh) first"
  mkdir -p "$dir/targets" "$dir/data" "$logs"
  write_config >"$dir/prometheus.yml.new"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    if ! cmp -s "$dir/prometheus.yml.new" "$dir/prometheus.yml"; then
      mv "$dir/prometheus.yml.new" "$dir/prometheus.yml"
      curl -fsS -X POST "http://127.0.0.1:$port/-/reload" >/dev/null
      log "configuration reloaded"
    fi
    rm -f "$dir/prometheus.yml.new"
    log "running on :$port"
    return 0
  fi
  mv "$dir/prometheus.yml.new" "$dir/prometheus.yml"
  setsid "$bin/prometheus" --config.file "$dir/prometheus.yml" --storage.tsdb.path "$dir/data" \
    --storage.tsdb.retention.time 6h --web.listen-address "0.0.0.0:$port" \
    --web.enable-lifecycle >"$logs/prometheus-$port.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  wait_for 60 "prometheus ready (see $logs/prometheus-$port.log)" \
    curl -fsS "http://127.0.0.1:$port/-/ready"
  log "ready: http://127.0.0.1:$port (targets: $dir/targets/*.json)"
}

down() {
  [ -f "$pidfile" ] || return 0
  local pid deadline=$((SECONDS + 15))
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  rm -rf "$dir/data"
  log "stopped"
}

status() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
