#!/usr/bin/env bash
# Builds the fleet's container images FROM scratch out of this workspace's binaries; no
# base image is pulled, so it works without any registry.
#
#   scm-hub/scm  scm-hub/machine-agent  scm-hub/backoffice  scm-hub/print-server-sim
#   scm-hub/rogue-agent (a misbehaving agent for the fault harness)
#
# Each image holds one binary (debug symbols stripped), the shared libraries `ldd` lists
# for it (glibc, libgcc_s, the dynamic loader; glibc >= 2.34 has the files and dns name
# services built in, so service names resolve through Docker's DNS), a minimal /etc
# (passwd, group, nsswitch.conf "hosts: files dns") and an empty /tmp. It runs as user
# 10001 unless the container is started with --user.
#
# Environment: PROFILE=debug|release (default debug), BIN_DIR (default target/PROFILE),
# TAG (default dev), NO_CARGO=1 to fail instead of building missing binaries.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
profile=${PROFILE:-debug}
bindir=${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/$profile}
tag=${TAG:-dev}
bins=(scm machine-agent backoffice print-server-sim rogue-agent)

missing=()
for b in "${bins[@]}"; do [ -x "$bindir/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${NO_CARGO:-}" = 1 ]; then
    echo "build.sh: missing binaries in $bindir: ${missing[*]}; run cargo build --workspace --bins" >&2
    exit 1
  fi
  release=()
  [ "$profile" = release ] && release=(--release)
  (cd "$root" && cargo build --quiet --workspace --bins "${release[@]}")
fi
command -v docker >/dev/null || { echo "build.sh: docker is not installed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The common root file system: /etc and /tmp.
common=$work/common
mkdir -p "$common/etc" "$common/tmp"
chmod 1777 "$common/tmp"
printf 'root:x:0:0:root:/:/nonexistent\nscm:x:10001:10001:scm hub:/nonexistent:/nonexistent\n' >"$common/etc/passwd"
printf 'root:x:0:\nscm:x:10001:\n' >"$common/etc/group"
printf 'hosts: files dns\n' >"$common/etc/nsswitch.conf"

for b in "${bins[@]}"; do
  # Skip an image whose binary and libraries have not changed.
  libs=$(ldd "$bindir/$b" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }')
  # shellcheck disable=SC2086
  sum=$(cat "$bindir/$b" $libs | sha256sum | cut -c1-32)
  have=$(docker image inspect --format '{{index .Config.Labels "scm-hub.content"}}' "scm-hub/$b:$tag" 2>/dev/null || true)
  if [ "$have" = "$sum" ]; then
    echo "scm-hub/$b:$tag is up to date"
    continue
  fi
  ctx=$work/$b
  mkdir -p "$ctx/rootfs/usr/local/bin"
  cp -a "$common/." "$ctx/rootfs/"
  if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$bindir/$b" "$ctx/rootfs/usr/local/bin/$b"
  else
    cp "$bindir/$b" "$ctx/rootfs/usr/local/bin/$b"
  fi
  # Shared libraries, at the paths the binary expects (the loader included).
  if [ -z "$libs" ] && ! ldd "$bindir/$b" 2>&1 | grep -q 'not a dynamic executable\|statically linked'; then
    echo "build.sh: ldd listed no libraries for $b" >&2
    exit 1
  fi
  for lib in $libs; do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/$b"]
LABEL org.opencontainers.image.title="$b" org.opencontainers.image.description="SCM hub: $b, built FROM scratch from the workspace" scm-hub.content="$sum"
DOCKERFILE
  old=$(docker image inspect --format '{{.Id}}' "scm-hub/$b:$tag" 2>/dev/null || true)
  DOCKER_BUILDKIT=0 docker build --quiet --tag "scm-hub/$b:$tag" "$ctx" >/dev/null 2>"$work/err" \
    || { cat "$work/err" >&2; echo "build.sh: docker build of scm-hub/$b:$tag failed" >&2; exit 1; }
  # The image this one replaced, unless a container still uses it.
  if [ -n "$old" ] && [ "$old" != "$(docker image inspect --format '{{.Id}}' "scm-hub/$b:$tag")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
  echo "built scm-hub/$b:$tag"
done
