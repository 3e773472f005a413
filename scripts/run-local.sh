#!/usr/bin/env bash
# `make run`: the simulator and the worker side by side on config/local.toml, a few sample
# requests published, and what happened to them. Ctrl-C stops everything.
# `make run PODS=3`: a local fleet of three worker pods (own store, HTTP port and worker id
# each) on the same queues; the samples are published twice and each key makes one session.
set -euo pipefail
BIN=${1:-target/debug/session-worker}
CONFIG=${2:-config/local.toml}
LISTEN=${3:-127.0.0.1:8089}
PODS=${4:-1}
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

echo "==> starting the worker (session-worker run): pod 1 of $PODS, metrics on 127.0.0.1:9464"
SESSION_WORKER__WORKER__ID=local-pod1 "$BIN" --config "$CONFIG" run &
pids+=($!)
worker_pid=$!
for n in $(seq 2 "$PODS"); do
  echo "==> starting pod $n of $PODS (own store data/local-pod$n, metrics on 127.0.0.1:$((9463 + n)))"
  SESSION_WORKER__WORKER__ID="local-pod$n" \
  SESSION_WORKER__STORE__PATH="data/local-pod$n" \
  SESSION_WORKER__HTTP__LISTEN="127.0.0.1:$((9463 + n))" \
    "$BIN" --config "$CONFIG" run --role worker &
  pids+=($!)
done
# The pods catch up with the fleet ledger and hear each other before they consume.
sleep 4

echo "==> publishing config/sample-requests.jsonl (its line 6 is invalid on purpose: publish refuses it and says why)"
"$BIN" --config "$CONFIG" publish config/sample-requests.jsonl || true
if [ "$PODS" -gt 1 ]; then
  echo "==> publishing the same requests again: the fleet answers them without new sessions"
  "$BIN" --config "$CONFIG" publish config/sample-requests.jsonl || true
fi
sleep 3
if command -v curl >/dev/null 2>&1; then
  echo "==> simulator stats ($SIM_URL/sim/stats):"
  curl -s "$SIM_URL/sim/stats"; echo
  echo "    (sessions_created = distinct_visitors and duplicate_sessions = 0: one session per key)"
fi
echo "==> latest audit entries (session-worker audit tail, read through the running worker's admin socket):"
"$BIN" --config "$CONFIG" audit tail -n 6 || true
echo "==> metrics: curl -s http://127.0.0.1:9464/metrics | grep session_requests_total"
echo "==> running; Ctrl-C to stop. Publish more with: $BIN --config $CONFIG publish FILE"
wait "$worker_pid"
