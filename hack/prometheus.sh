#!/usr/bin/env bash
# Debian's Prometheus as a local process. Scrape targets come from file-based service
# discovery: drop a JSON file into .cache/prometheus/targets/ and it is picked up within
# seconds, no restart. Usage: hack/prometheus.sh up|down|status
# Env: MODELPILOT_PROMETHEUS_PORT (19090), MODELPILOT_SCRAPE_INTERVAL (2s),
#      MODELPILOT_PROMETHEUS_DIR (.cache/prometheus: config, targets, data, pid)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${MODELPILOT_PROMETHEUS_DIR:-$root/.cache/prometheus}
logs="$root/.cache/logs"
port=${MODELPILOT_PROMETHEUS_PORT:-19090}
interval=${MODELPILOT_SCRAPE_INTERVAL:-2s}
pidfile="$dir/prometheus.pid"

log() { printf '%s prometheus: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

up() {
  command -v prometheus >/dev/null || { log "prometheus not found: apt-get install prometheus"; exit 1; }
  mkdir -p "$dir/targets" "$dir/data" "$logs"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    log "already running on :$port"
    return 0
  fi
  cat >"$dir/prometheus.yml" <<EOF
global:
  scrape_interval: $interval
  evaluation_interval: $interval
scrape_configs:
  - job_name: prometheus
    static_configs: [{targets: ["127.0.0.1:$port"]}]
  - job_name: modelpilot
    file_sd_configs:
      - files: ["$dir/targets/*.json"]
        refresh_interval: 2s
EOF
  setsid prometheus --config.file "$dir/prometheus.yml" --storage.tsdb.path "$dir/data" \
    --storage.tsdb.retention.time 6h --web.listen-address "127.0.0.1:$port" \
    --web.enable-lifecycle >"$logs/prometheus-$port.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  local deadline=$((SECONDS + 60))
  until curl -fsS "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { log "not ready after 60s (see $logs/prometheus-$port.log)"; exit 1; }
    sleep 0.2
  done
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
