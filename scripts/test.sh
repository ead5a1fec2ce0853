#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and end-to-end tests that start the real
# binaries and drive them with real telnet clients, the Ansible deployment into a prefix, and
# (when a Docker engine answers) the multi-container fault harness and the compose fleet.
# Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v telnet >/dev/null 2>&1 || need+=(inetutils-telnet)
command -v busybox >/dev/null 2>&1 || need+=(busybox)
command -v telnet-ssl >/dev/null 2>&1 || need+=(telnet-ssl)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing test tools: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing test tools: ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The end-to-end tests run the binaries; build them once up front.
cargo build --quiet --workspace --bins
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
cargo test --workspace --doc --quiet
echo
echo "== Prometheus rules: promtool check rules and unit tests (deploy/prometheus/check.sh) =="
bash deploy/prometheus/check.sh
echo "== Debian packages: build, lintian, install into fresh roots (deploy/debian/check.sh) =="
bash deploy/debian/check.sh
echo "== Ansible deployment, for real into a prefix (deploy/ansible/ci-smoke.sh) =="
bash deploy/ansible/ci-smoke.sh
echo "== multi-container fault harness (integration-tests/tests/containers) =="
if docker info >/dev/null 2>&1; then
  TAG=ci bash deploy/images/build.sh
  SCM_CONTAINER_TESTS=1 SCM_IMAGES_TAG=ci cargo nextest run -p integration-tests --test containers --profile containers
  echo "== compose fleet smoke run (deploy/compose/fleet.sh smoke) =="
  TAG=ci bash deploy/compose/fleet.sh smoke
else
  echo "SKIPPED the multi-container harness: no Docker engine here (docker info failed)"
fi
