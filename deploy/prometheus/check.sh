#!/usr/bin/env bash
# Checks the Prometheus rules and runs their unit tests (promtool from Debian's
# `prometheus` package, installed here when missing and running as root).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is missing; install it (Debian: apt-get install prometheus)" >&2
    exit 1
  fi
fi
promtool check rules scm-hub.rules.yml
promtool test rules scm-hub.rules.test.yml
