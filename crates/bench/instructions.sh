#!/usr/bin/env bash
# Instructions a `steward serve` process spends per run, counted by valgrind's callgrind (the
# same count whatever else the machine is doing): the server runs under callgrind, 4
# `steward bench-client` processes drive it (Submit then Exec, 3 `noop` jobs a run), once with
# SMALL runs and once with LARGE; the difference over LARGE - SMALL runs leaves start-up out.
#
#   crates/bench/instructions.sh [off|logs|spans|on ...]
#
# The settings are those of `steward bench --suite telemetry`: `off` (RUST_LOG=off, no
# exporter), `logs` (JSON at info), `spans` (OTLP to a sink on loopback), `on` (both).
# Needs valgrind, python3 (the OTLP sink) and curl; uses the release binary and ports 47001
# and 47318 on 127.0.0.1 (BIN=PATH: another binary). Kernel time (fsync, syscalls) is not counted. With KEEP=DIR, each
# LARGE run's callgrind output is kept as DIR/SETTING.cg.out (for callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${BIN:-target/release/steward}
small=${SMALL:-400}
large=${LARGE:-2400}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# An OTLP/HTTP receiver that takes each batch and answers 200.
python3 -c '
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 47318), H).serve_forever()
' &

count() { # MODE RUNS -> instructions
  local mode=$1 runs=$2 d
  d=$(mktemp -d "$work/runXXXX")
  printf '[workflows.bench]\n' >"$d/policies.toml"
  local env=(STEWARD_AUTH=none RUST_LOG=off)
  local otlp=(STEWARD_OTLP_ENDPOINT=http://127.0.0.1:47318 OTEL_BSP_SCHEDULE_DELAY=200)
  case $mode in
    off) ;;
    logs) env=(STEWARD_AUTH=none RUST_LOG=info STEWARD_LOG_FORMAT=json) ;;
    spans) env+=("${otlp[@]}") ;;
    on) env=(STEWARD_AUTH=none RUST_LOG=info STEWARD_LOG_FORMAT=json "${otlp[@]}") ;;
    *) echo "unknown setting $mode" >&2; exit 2 ;;
  esac
  env "${env[@]}" valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" \
    "$bin" serve --data-dir "$d" --listen 127.0.0.1:47001 2>"$d/server.log" &
  local server=$!
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null http://127.0.0.1:47001/healthz && break
    sleep 0.2
  done
  mkfifo "$d/go"
  local clients=()
  for i in 1 2 3 4; do
    "$bin" bench-client --addr 127.0.0.1:47001 --dir "$d" --runs $((runs / 4)) --jobs 3 \
      --key-prefix "c$i" <"$d/go" >"$d/c$i.json" &
    clients+=($!)
  done
  sleep 1
  printf 'go\ngo\ngo\ngo\n' >"$d/go"
  wait "${clients[@]}"
  sleep 1
  kill -TERM "$server"
  wait "$server" || true
  if [[ -n ${KEEP:-} && $runs == "$large" ]]; then
    mkdir -p "$KEEP" && cp "$d/cg.out" "$KEEP/$mode.cg.out"
  fi
  grep -h '^summary:\|^totals:' "$d/cg.out" | head -1 | awk '{print $2}'
}

for mode in "${@:-off logs spans on}"; do
  for m in $mode; do
    a=$(count "$m" "$small")
    b=$(count "$m" "$large")
    echo "$m: $(((b - a) / (large - small))) instructions per run"
  done
done
