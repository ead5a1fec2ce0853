#!/usr/bin/env bash
# The main job: build the workspace, create a development fleet (SCM + 3 agents) on
# 127.0.0.1, push a configuration end to end with the back office, and keep the fleet
# running so an operator can telnet in. Ctrl-C stops everything.
#
#   DEMO_DIR=./dev   where the PKI, configurations, logs and agent state go
#   DEMO_EXIT=1      stop after the demonstration instead of waiting (used by CI)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DEMO_DIR:-./dev}
BIN=./target/debug

echo "== building (cargo build) =="
cargo build --quiet --workspace --bins

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Waits (bounded) until FILE contains TEXT.
wait_for() {
  local file=$1 text=$2 i
  for i in $(seq 1 300); do
    grep -q -- "$text" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$text' in $file:" >&2
  cat "$file" >&2
  exit 1
}

if [ ! -f "$DIR/scm.toml" ]; then
  echo "== creating a development PKI and configurations in $DIR =="
  $BIN/scm init-dev --out "$DIR" --machines 1,2,3   # also writes $DIR/init.txt
fi

echo "== starting the SCM =="
$BIN/scm serve --config "$DIR/scm.toml" >"$DIR/scm.log" 2>&1 &
pids+=($!)
wait_for "$DIR/scm.log" "(telnet)"
grep "listening on" "$DIR/scm.log" | sed 's/.*INFO /  /'

for id in 1 2 3; do
  $BIN/machine-agent --config "$DIR/agent-$id.toml" >"$DIR/agent-$id.log" 2>&1 &
  pids+=($!)
done
for id in 1 2 3; do
  wait_for "$DIR/agent-$id.log" "connected to SCM"
  echo "  agent $id connected"
done

echo
echo "== pushing a configuration to machine 2 with the back office =="
cfg="$DIR/example.cfg"
printf '# example machine configuration\ntray.default = 2\ncolor = true\n' >"$cfg"
set +e
$BIN/backoffice --config "$DIR/backoffice.toml" push --machine 2 --file "$cfg"
rc=$?
set -e
echo "backoffice exit code: $rc (0 = ACK)"
echo "stored on machine 2 ($DIR/machine-2/config.current):"
sed 's/^/  | /' "$DIR/machine-2/config.current"
[ "$rc" -eq 0 ] || { echo "the push was not acknowledged" >&2; exit 1; }
echo
echo "== a fleet push to group odd (machines 1 and 3), with live progress =="
printf '# lobby printers\nsleep.minutes = 15\n' >"$DIR/odd.cfg"
set +e
$BIN/backoffice --config "$DIR/backoffice.toml" push --target group:odd --file "$DIR/odd.cfg"
rc=$?
set -e
[ "$rc" -eq 0 ] || { echo "the group push was not acknowledged by every machine" >&2; exit 1; }
echo
echo "== fleet as the SCM sees it =="
$BIN/backoffice --config "$DIR/backoffice.toml" machines

echo
echo "== a card swipe: machine 1's reader -> agent -> SCM -> Generic bridge -> print server =="
ports=$(grep -o 'listening on [0-9.:]* (generic [0-9]*/r1)' "$DIR/scm.log" | awk '{print $3}')
sim_args=()
for p in $ports; do sim_args+=(--connect "$p"); done
$BIN/print-server-sim "${sim_args[@]}" --keepalive-ms 5000 >"$DIR/print-server.log" 2>&1 &
pids+=($!)
wait_for "$DIR/print-server.log" "CONNECTED"
wait_for "$DIR/agent-1.log" "reader r1"
echo "  swiping card 12345678 on machine 1 (echo 12345678 > $DIR/machine-1-r1.fifo)"
echo 12345678 >"$DIR/machine-1-r1.fifo"
wait_for "$DIR/print-server.log" "CARD 12345678"
echo "  the print-server simulator read: $(grep 'CARD 12345678' "$DIR/print-server.log" | head -1)"
echo
echo "== the same readers as RFIDeas 241s in Client Mode: configured over HTTP, swipes over HTTPS =="
rfideas=$(grep -o 'listening on [0-9.:]* (rfideas)' "$DIR/scm.log" | awk '{print $3}')
$BIN/print-server-241-sim --scm "$rfideas" --host reader-2.localhost --check-ms 5000 \
  --set mode=client --set 'server_url=https://{https}/swipe?card={card}&mac={device}&t={time}' \
  --cert "$DIR/scm.pem" --key "$DIR/scm-key.pem" >"$DIR/print-server-241.log" 2>&1 &
pids+=($!)
wait_for "$DIR/print-server-241.log" "CONFIGURED"
echo "  a print server configured reader-2.localhost at $rfideas; swiping card 87654321 on machine 2"
echo 87654321 >"$DIR/machine-2-r1.fifo"
wait_for "$DIR/print-server-241.log" "CARD 87654321"
echo "  the 241 print-server simulator received: $(grep 'CARD 87654321' "$DIR/print-server-241.log" | head -1)"

echo
echo "== swipes as the SCM journals them (card numbers masked) =="
$BIN/backoffice --config "$DIR/backoffice.toml" swipes

if [ "${DEMO_EXIT:-0}" = "1" ]; then
  echo "demo finished (DEMO_EXIT=1)"
  exit 0
fi
echo
echo "The fleet keeps running. Log in as an operator with any telnet client:"
echo "  telnet 127.0.0.1 2323      (user admin, password in $DIR/init.txt)"
echo "  $BIN/backoffice --config $DIR/backoffice.toml shell"
echo "Swipe a card: echo 87654321 > $DIR/machine-2-r1.fifo   (the print servers' view: $DIR/print-server.log, $DIR/print-server-241.log)"
echo "Logs: $DIR/*.log. Press Ctrl-C to stop."
wait
