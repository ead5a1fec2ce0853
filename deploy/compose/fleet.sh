#!/usr/bin/env bash
# A local container fleet from this repository (see README.md next to this file).
#
#   ./fleet.sh up            build the images, write ./fleet with `scm init-dev` (once),
#                            start the SCM, 3 agents and the print-server simulator, wait
#                            until every agent is connected, print how to log in
#   ./fleet.sh swipe ID CARD swipe CARD at machine ID's reader r1
#   ./fleet.sh bo ARGS...    run the back office (e.g. ./fleet.sh bo machines)
#   ./fleet.sh logs [SVC]    follow the logs
#   ./fleet.sh down          stop and remove the containers and the network (./fleet stays)
#   ./fleet.sh clean         down, then remove ./fleet
#   ./fleet.sh smoke         CI: a throw-away fleet (own directory, project, /24 and
#                            random loopback ports): up, telnet login, push to all, a
#                            swipe to the print server, down
#
# Environment: FLEET_NET (first three octets of the /24, default 10.213.250), TELNET_PORT
# and TELNET_TLS_PORT (published on 127.0.0.1; default 2323 and 2324), TAG (image tag,
# default dev), PROFILE (debug or release binaries, default debug).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
self=$here/$(basename "$0")
cd "$here"
export FLEET_NET=${FLEET_NET:-10.213.250}
export FLEET_DIR=${FLEET_DIR:-$here/fleet}
project=${FLEET_PROJECT:-scm-fleet}
export FLEET_UID=${FLEET_UID:-$(id -u)}
export FLEET_GID=${FLEET_GID:-$(id -g)}
export TAG=${TAG:-dev}
profile=${PROFILE:-debug}
bindir=${CARGO_TARGET_DIR:-$root/target}/$profile

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p "$project" "$@"
  elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose -p "$project" "$@"
  else
    echo "fleet.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
  fi
}

# Waits (bounded) until `needle` appears in the logs of service $1.
wait_log() {
  local svc=$1 needle=$2 i
  for i in $(seq 1 120); do
    # (Capture first: grep -q would end the pipe early, and pipefail would call it failed.)
    if grep -q -- "$needle" <<<"$(compose logs --no-color "$svc" 2>&1)"; then return 0; fi
    sleep 0.5
  done
  echo "fleet.sh: $svc did not log '$needle' within 60 s; its logs:" >&2
  compose logs --no-color "$svc" >&2 || true
  return 1
}

case "${1:-}" in
  up)
    PROFILE=$profile TAG=$TAG bash "$root/deploy/images/build.sh"
    if [ ! -f "$FLEET_DIR/scm.toml" ]; then
      "$bindir/scm" init-dev --out "$FLEET_DIR" --machines 1,2,3 \
        --bind 0.0.0.0 --scm-host scm --allow "$FLEET_NET.50" | tee "$FLEET_DIR.init.txt"
    fi
    compose up -d scm agent-1 agent-2 agent-3 print-server
    for a in agent-1 agent-2 agent-3; do wait_log "$a" "connected to SCM at scm:9300"; done
    wait_log print-server "CONNECTED"
    echo
    echo "fleet is up. Log in: telnet 127.0.0.1 ${TELNET_PORT:-2323}  (user admin, password below)"
    grep 'operator login' "$FLEET_DIR.init.txt" || true
    echo "swipe: $self swipe 1 12345678   back office: $self bo machines   stop: $self down"
    ;;
  swipe)
    [ $# -eq 3 ] || { echo "usage: $self swipe MACHINE CARD" >&2; exit 2; }
    fifo="$FLEET_DIR/machine-$2-r1.fifo"
    [ -p "$fifo" ] || { echo "fleet.sh: $fifo is no FIFO; is agent-$2 running?" >&2; exit 1; }
    timeout 10 bash -c "echo '$3' > '$fifo'"
    ;;
  bo)
    shift
    compose run --rm backoffice "$@"
    ;;
  logs)
    shift
    compose logs -f "$@"
    ;;
  down)
    compose --profile tools down --remove-orphans
    ;;
  clean)
    compose --profile tools down --remove-orphans
    rm -rf "$FLEET_DIR" "$FLEET_DIR.init.txt"
    ;;
  smoke)
    work=$(mktemp -d)
    export FLEET_DIR=$work/fleet FLEET_PROJECT=scm-fleet-smoke FLEET_NET=${SMOKE_NET:-10.213.251}
    project=$FLEET_PROJECT
    export TELNET_PORT=0 TELNET_TLS_PORT=0
    trap 'FLEET_DIR=$FLEET_DIR bash "$self" down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
    bash "$self" up
    port=$(docker port "$FLEET_PROJECT"_scm_1 2323/tcp 2>/dev/null | head -1 | sed 's/.*://')
    [ -n "$port" ] || port=$(compose port scm 2323 | sed 's/.*://')
    pw=$(sed -n 's/^operator login: admin \/ //p' "$FLEET_DIR.init.txt")
    # A real telnet session through the published loopback port.
    if command -v telnet >/dev/null; then
      out=$( (sleep 1; echo admin; sleep 0.5; echo "$pw"; sleep 1; echo machines; sleep 1; echo quit; sleep 0.5) \
        | timeout 20 telnet 127.0.0.1 "$port" 2>&1 || true)
      grep -q '^250 3 machines' <<<"$out" || { echo "fleet.sh smoke: telnet to 127.0.0.1:$port failed:" >&2; echo "$out" >&2; exit 1; }
      echo "telnet 127.0.0.1:$port: logged in, 3 machines listed"
    else
      echo "fleet.sh smoke: no telnet client; telnet check skipped"
    fi
    echo "mode=compose-smoke" >"$FLEET_DIR/smoke.cfg"
    bash "$self" bo push --target all --file /fleet/smoke.cfg
    bash "$self" swipe 2 SMOKE123
    for i in $(seq 1 100); do
      grep -q 'CARD SMOKE123' <<<"$(compose logs --no-color print-server 2>&1)" && break
      [ "$i" = 100 ] && { echo "fleet.sh smoke: the swipe did not reach the print server" >&2; exit 1; }
      sleep 0.2
    done
    echo "fleet.sh smoke: the compose fleet works (telnet, push to all ACKed, swipe delivered)"
    ;;
  *)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
