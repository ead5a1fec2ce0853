#!/usr/bin/env bash
# CI check of the Ansible deployment, for real, on this machine:
#
#  1. installs pinned ansible-core and ansible-lint from PyPI into a venv, runs ansible-lint;
#  2. deploys site.yml with connection local into a prefix (every path of the three roles
#     under it; systemd is not PID 1 here, so units are rendered, not started), creating
#     the dedicated users for real when run as root;
#  3. runs the playbook a second time and requires changed=0 on every host, then a third
#     time with a changed setting and requires the handlers to fire;
#  4. checks the files' permissions and verifies the units with systemd-analyze;
#  5. starts the deployed binaries from the prefix, with the deployed configurations, as
#     the dedicated users (SCM, one agent), pushes a configuration with the deployed
#     back office and requires the ACK and the file on the agent's disk.
#
# Environment: BIN_DIR (default target/debug; built if missing), ANSIBLE_VENV (default
# ~/.cache/scm-hub-ansible-<versions>), KEEP=1 keeps the work directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ANSIBLE_CORE_VERSION=2.17.7
ANSIBLE_LINT_VERSION=24.12.2

bindir=${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/debug}
for b in scm machine-agent backoffice; do
  if [ ! -x "$bindir/$b" ]; then
    (cd "$root" && cargo build --quiet --workspace --bins)
    break
  fi
done

# 1. Ansible from PyPI, pinned.
venv=${ANSIBLE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/scm-hub-ansible-$ANSIBLE_CORE_VERSION-$ANSIBLE_LINT_VERSION}
if [ ! -x "$venv/bin/ansible-playbook" ] || [ ! -x "$venv/bin/ansible-lint" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"
      python3 -m venv "$venv"
    else
      echo "ci-smoke: python3 -m venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "ansible-core==$ANSIBLE_CORE_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION"
fi
export PATH="$venv/bin:$PATH"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 ANSIBLE_CONFIG="$here/ansible.cfg"
ansible-playbook --version >"${TMPDIR:-/tmp}/scm-hub-ansible-version.txt" && head -1 "${TMPDIR:-/tmp}/scm-hub-ansible-version.txt"

echo "== ansible-lint =="
(cd "$here" && ansible-lint --offline --nocolor)

# 2. Deploy into a prefix.
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
prefix=$work/root
# The prefix mirrors a host: /etc, /var/lib, /usr/local/bin exist (the roles create only
# their own directories below them; Ansible would give missing parents the role's owner
# and mode).
mkdir -p "$prefix/etc/systemd/system" "$prefix/var/lib" "$prefix/usr/local/bin"
chmod -R 755 "$prefix"
"$bindir/scm" init-dev --out "$work/pki" --machines 1 >"$work/init.txt"
password=$(sed -n 's/^operator login: admin \/ //p' "$work/init.txt")
hash=$(sed -n 's/^password_hash = "\(.*\)"$/\1/p' "$work/pki/scm.toml" | head -1)
[ -n "$password" ] && [ -n "$hash" ] || { echo "ci-smoke: no password from init-dev" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then
  users=true
  owner=root
  scm_user=scm-hub agent_user=machine-agent bo_user=scm-backoffice
else
  # Without root: no users are created, everything belongs to the caller.
  users=false
  owner=$(id -un)
  scm_user=$owner agent_user=$owner bo_user=$owner
fi
cat >"$work/inventory.yml" <<INVENTORY
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: $venv/bin/python
    scm_hub_become: false
    scm_hub_prefix: $prefix
    scm_hub_artifacts_dir: $bindir
    scm_hub_pki_dir: $work/pki
    scm_hub_address: 127.0.0.1
  children:
    scm_hubs:
      hosts:
        ci-hub:
          scm_create_user: $users
          scm_user: $scm_user
          scm_group: $scm_user
          scm_file_owner: $owner
          scm_manage_service: false
          scm_log_format: human
          scm_listen_agents: "127.0.0.1:0"
          scm_listen_telnet: "127.0.0.1:0"
          scm_listen_telnet_tls: "127.0.0.1:0"
          scm_listen_metrics: "127.0.0.1:0"
          scm_listen_admin: "127.0.0.1:0"
          scm_operators:
            - name: admin
              role: admin
              password_hash: '$hash'
          scm_generic_devices:
            - machine: 1
              reader: r1
              listen: "127.0.0.1:0"
              allow: ["127.0.0.1"]
    machines:
      hosts:
        ci-machine-1:
          machine_agent_id: 1
          machine_agent_groups: [ci]
          machine_agent_create_user: $users
          machine_agent_user: $agent_user
          machine_agent_group: $agent_user
          machine_agent_file_owner: $owner
          machine_agent_manage_service: false
          machine_agent_log_format: human
          machine_agent_listen_config: "127.0.0.1:0"
          machine_agent_listen_metrics: ""
          machine_agent_readers:
            - id: r1
              kind: fifo
              path: r1.fifo
    operators:
      hosts:
        ci-office:
          backoffice_create_user: $users
          backoffice_user: $bo_user
          backoffice_group: $bo_user
          backoffice_file_owner: $owner
          backoffice_manage_service: false
          backoffice_tls: false
          backoffice_password: '$password'
INVENTORY

play() {
  (cd "$here" && ansible-playbook -i "$work/inventory.yml" site.yml "$@") | tee "$work/play.out"
}
# changed=N of every host in the recap.
changed() { sed -n 's/.* changed=\([0-9]*\).*/\1/p' "$work/play.out"; }
failed() { sed -n 's/.* failed=\([0-9]*\).*/\1/p' "$work/play.out" | grep -v '^0$' || true; }

echo "== deploy: first run =="
play
[ -z "$(failed)" ] || { echo "ci-smoke: the first run failed" >&2; exit 1; }
first=$(changed | awk '{ s += $1 } END { print s + 0 }')
[ "$first" -gt 0 ] || { echo "ci-smoke: the first run changed nothing?" >&2; exit 1; }

# 3. Idempotence, then handlers.
echo "== deploy: second run (must report changed=0) =="
play
[ -z "$(failed)" ] || { echo "ci-smoke: the second run failed" >&2; exit 1; }
if [ "$(changed | sort -u)" != "0" ]; then
  echo "ci-smoke: the second run changed something: changed=$(changed | paste -sd,)" >&2
  exit 1
fi
echo "second run: changed=0 on $(changed | wc -l) hosts"

echo "== deploy: third run with a changed setting (handlers must fire) =="
play -e scm_log_format=json -e machine_agent_log_format=json
grep -q 'RUNNING HANDLER \[scm : Restart scm\]' "$work/play.out" \
  || { echo "ci-smoke: the scm handler did not run after its configuration changed" >&2; exit 1; }
grep -q 'RUNNING HANDLER \[machine_agent : Restart machine-agent\]' "$work/play.out" \
  || { echo "ci-smoke: the machine_agent handler did not run" >&2; exit 1; }
echo "== deploy: back to the first settings =="
play >/dev/null

# 4. Permissions and units.
check_mode() {
  local want=$1 file=$2 got
  got=$(stat -c '%a %U %G' "$file")
  [ "$got" = "$want" ] || { echo "ci-smoke: $file is '$got', want '$want'" >&2; exit 1; }
}
check_mode "640 $owner $scm_user" "$prefix/etc/scm-hub/tls/scm-key.pem"
check_mode "640 $owner $scm_user" "$prefix/etc/scm-hub/scm.toml"
check_mode "750 $owner $scm_user" "$prefix/etc/scm-hub/tls"
check_mode "750 $scm_user $scm_user" "$prefix/var/lib/scm-hub"
check_mode "640 $owner $agent_user" "$prefix/etc/machine-agent/tls/machine-key.pem"
check_mode "640 $owner $bo_user" "$prefix/etc/scm-backoffice/tls/operator-key.pem"
check_mode "640 $owner $bo_user" "$prefix/etc/scm-backoffice/backoffice.toml"
for u in scm.service machine-agent.service scm-backoffice-watch.service; do
  unit=$prefix/etc/systemd/system/$u
  for k in 'ProtectSystem=strict' 'NoNewPrivileges=yes' 'Restart=on-failure' 'User='; do
    grep -q "^$k" "$unit" || { echo "ci-smoke: $u lacks $k" >&2; exit 1; }
  done
done
if command -v systemd-analyze >/dev/null; then
  echo "== systemd-analyze verify =="
  # The units name binaries in the prefix; verify them as rendered. systemd is not PID 1
  # here, so dependencies on targets are not checked.
  if ! (cd "$prefix/etc/systemd/system" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
      ./scm.service ./machine-agent.service ./scm-backoffice-watch.service) 2>&1 | tee "$work/verify.out"; then
    echo "ci-smoke: systemd-analyze verify failed" >&2
    exit 1
  fi
  if grep -v -e 'multi-user.target' -e 'network-online.target' -e '^$' "$work/verify.out" | grep -q .; then
    echo "ci-smoke: systemd-analyze verify reported problems (above)" >&2
    exit 1
  fi
else
  echo "systemd-analyze is not installed: units not verified"
fi

# 5. Start what was deployed, as the dedicated users.
runas() {
  if [ "$(id -u)" = 0 ]; then echo setpriv --reuid="$1" --regid="$1" --init-groups; fi
}
wait_line() {
  local file=$1 needle=$2 i
  for i in $(seq 1 300); do
    if grep -q -- "$needle" "$file" 2>/dev/null; then
      grep -- "$needle" "$file" | tail -1
      return 0
    fi
    sleep 0.1
  done
  echo "ci-smoke: '$needle' not in $file within 30 s:" >&2
  cat "$file" >&2
  return 1
}
addr_of() { wait_line "$1" "($2)" | sed -n 's/.*listening on \([^ ]*\) .*/\1/p'; }

echo "== smoke: the deployed binaries =="
bin=$prefix/usr/local/bin
chmod 755 "$work"
# shellcheck disable=SC2046
(cd "$prefix/var/lib/scm-hub" && exec env NO_COLOR=1 $(runas "$scm_user") \
  "$bin/scm" serve --config "$prefix/etc/scm-hub/scm.toml") 2>"$work/scm.log" &
pids+=($!)
agents=$(addr_of "$work/scm.log" agents)
telnet=$(addr_of "$work/scm.log" telnet)
# shellcheck disable=SC2046
(cd "$prefix/var/lib/machine-agent" && exec env NO_COLOR=1 AGENT__SCM__ADDRESS="$agents" $(runas "$agent_user") \
  "$bin/machine-agent" --config "$prefix/etc/machine-agent/agent.toml") 2>"$work/agent.log" &
pids+=($!)
wait_line "$work/agent.log" "connected to SCM at $agents" >/dev/null
echo "smoke-test=deployed-by-ansible" >"$work/smoke.cfg"
chmod 644 "$work/smoke.cfg"
set +e
# shellcheck disable=SC2046
out=$(env BACKOFFICE__SCM__ADDRESS="$telnet" $(runas "$bo_user") "$bin/backoffice" \
  --config "$prefix/etc/scm-backoffice/backoffice.toml" push --machine 1 --file "$work/smoke.cfg" 2>&1)
code=$?
set -e
echo "$out"
if [ "$code" != 0 ] || ! grep -q '^250 ACK machine 1 generation 1' <<<"$out"; then
  echo "ci-smoke: the push was not ACKed (exit $code)" >&2
  cat "$work/scm.log" "$work/agent.log" >&2
  exit 1
fi
stored=$prefix/var/lib/machine-agent/config/config.current
cmp -s "$stored" "$work/smoke.cfg" || { echo "ci-smoke: $stored does not hold the pushed file" >&2; exit 1; }

# 6. The scm_config module (library/scm_config.py) against the running fleet, twice:
#    ACK reports changed, the second run (content already applied) changed=0; check mode
#    reports a change without pushing; an unknown machine fails with the SCM's reason.
echo "== scm_config module: push-config.yml against the deployed fleet =="
mkdir -p "$work/files"
echo "pushed-by=scm_config" >"$work/files/m1.cfg"
cat >"$work/pushes.yml" <<PUSHES
scm_config_backoffice: $bin/backoffice
scm_config_backoffice_config: $prefix/etc/scm-backoffice/backoffice.toml
scm_config_environment:
  BACKOFFICE__SCM__ADDRESS: "$telnet"
scm_config_pushes:
  - machine: 1
    src: $work/files/m1.cfg
  - target: "group:ci"
    src: $work/files/m1.cfg
PUSHES
push_play() {
  (cd "$here" && ansible-playbook -i "$work/inventory.yml" push-config.yml --limit operators -e "@$work/pushes.yml" "$@") | tee "$work/play.out"
}
push_play --check
[ -z "$(failed)" ] || { echo "ci-smoke: scm_config check mode failed" >&2; exit 1; }
[ "$(changed)" = 1 ] || { echo "ci-smoke: scm_config check mode did not report the change (changed=$(changed))" >&2; exit 1; }
cmp -s "$stored" "$work/smoke.cfg" || { echo "ci-smoke: check mode pushed something" >&2; exit 1; }
push_play
[ -z "$(failed)" ] || { echo "ci-smoke: scm_config push failed" >&2; exit 1; }
[ "$(changed)" = 1 ] || { echo "ci-smoke: scm_config: the first push did not report changed (changed=$(changed))" >&2; exit 1; }
cmp -s "$stored" "$work/files/m1.cfg" || { echo "ci-smoke: $stored does not hold the file pushed by scm_config" >&2; exit 1; }
echo "== scm_config module: second run (must report changed=0) =="
push_play
[ -z "$(failed)" ] || { echo "ci-smoke: scm_config second run failed" >&2; exit 1; }
[ "$(changed)" = 0 ] || { echo "ci-smoke: scm_config second run changed=$(changed), want 0" >&2; exit 1; }
push_play --check
[ "$(changed)" = 0 ] || { echo "ci-smoke: scm_config check mode reports a change for applied content" >&2; exit 1; }
echo "== scm_config module: an unknown machine fails with the SCM's reason =="
set +e
(cd "$here" && BACKOFFICE__SCM__ADDRESS="$telnet" ansible -i "$work/inventory.yml" operators -m scm_config \
  -a "machine=99 src=$work/files/m1.cfg backoffice=$bin/backoffice config=$prefix/etc/scm-backoffice/backoffice.toml" \
  -e "ansible_python_interpreter=$venv/bin/python" 2>&1) >"$work/fail.out"
set -e
grep -q 'FAILED' "$work/fail.out" && grep -q 'not known to this SCM' "$work/fail.out" \
  || { echo "ci-smoke: scm_config did not fail with the SCM's reason for machine 99:" >&2; cat "$work/fail.out" >&2; exit 1; }
echo "ci-smoke: the Ansible deployment works (lint clean, idempotent, handlers fire, binaries deployed, push ACKed; scm_config idempotent, check mode, failure reason)"
