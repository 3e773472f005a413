#!/usr/bin/env bash
# `make run`: the simulator and the worker side by side on config/local.toml, a few sample
# requests published, and what happened to them. Ctrl-C stops everything.
set -euo pipefail
BIN=${1:-target/debug/session-worker}
CONFIG=${2:-config/local.toml}
LISTEN=${3:-127.0.0.1:8089}
SIM_URL="http://$LISTEN"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

mkdir -p data
echo "==> configuration ($CONFIG), secrets redacted:"
"$BIN" --config "$CONFIG" check-config | sed -n '1,12p'
echo "    ... (run '$BIN --config $CONFIG check-config' for all of it)"

echo "==> starting the Genesys Cloud simulator on $LISTEN"
"$BIN" sim --listen "$LISTEN" --reject-queue unknown-queue --latency 50ms &
pids+=($!)
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/${LISTEN%:*}/${LISTEN##*:}") 2>/dev/null && break
  sleep 0.1
done

echo "==> starting the worker (session-worker run)"
"$BIN" --config "$CONFIG" run &
pids+=($!)
sleep 2

if "$BIN" publish --help >/dev/null 2>&1; then
  echo "==> publishing config/sample-requests.jsonl"
  "$BIN" --config "$CONFIG" publish config/sample-requests.jsonl || true
fi
sleep 2
if command -v curl >/dev/null 2>&1; then
  echo "==> simulator stats ($SIM_URL/sim/stats):"
  curl -s "$SIM_URL/sim/stats"; echo
fi
echo "==> latest audit entries (session-worker audit tail, read through the worker's HTTP endpoint):"
"$BIN" --config "$CONFIG" audit tail -n 6 || true
echo "==> metrics: curl -s http://127.0.0.1:9464/metrics | grep session_requests_total"
echo "==> running; Ctrl-C to stop. Publish more with: $BIN --config $CONFIG publish FILE"
wait "${pids[1]}"
