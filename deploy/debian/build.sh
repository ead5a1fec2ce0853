#!/usr/bin/env bash
# Builds the Debian packages scm-hub, scm-machine-agent and scm-backoffice with cargo-deb
# into target/debian (or DEB_OUT_DIR): man pages and completions first (cargo xtask), then one
# `cargo deb --no-build` per package from the binaries already built.
#
# DEB_PROFILE=release (the default) builds release binaries, what a production package should
# hold; DEB_PROFILE=dev packages target/debug as scripts/test.sh built it, which is what CI
# checks (the packaging is the same, and it saves a release build of the workspace).
# Installs cargo-deb (pinned) when it is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
CARGO_DEB_VERSION=3.8.0
profile=${DEB_PROFILE:-release}
out=${DEB_OUT_DIR:-$root/target/debian}

if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install --quiet --locked --version "$CARGO_DEB_VERSION" cargo-deb
fi

target=${CARGO_TARGET_DIR:-$root/target}
if [ "$profile" = dev ]; then
  # The same command as scripts/test.sh, so that nothing is rebuilt there: selecting
  # packages with -p unifies features differently and would rebuild the libraries.
  cargo build --quiet --workspace --bins
  bindir=$target/debug
  # A test package: compress fast.
  fast=--fast
else
  cargo build --quiet --profile "$profile" -p scm -p machine-agent -p backoffice -p xtask --bins
  bindir=$target/$profile
  fast=
fi
# The packages' assets point here (../target/debian-docs in each [package.metadata.deb]).
# The xtask binary is run directly: `cargo xtask` would select its package alone and
# rebuild the libraries with its own feature set.
rm -rf "$root/target/debian-docs"
"$bindir/xtask" man-and-completions --out "$root/target/debian-docs" >/dev/null
mkdir -p "$out"
for crate in scm machine-agent backoffice; do
  cargo deb --quiet --no-build $fast --profile "$profile" -p "$crate" --output "$out"
done
