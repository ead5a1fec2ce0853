#!/usr/bin/env bash
# CI check of the Debian packages (docs/deployment.md, "Debian packages"):
#
#  1. builds scm-hub, scm-machine-agent and scm-backoffice (build.sh; DEB_PROFILE=dev by default:
#     the debug binaries scripts/test.sh already built);
#  2. runs lintian on them and fails on any error (E:);
#  3. installs each into a fresh root of its own with `dpkg --root`, the maintainer scripts
#     run chrootless with DPKG_ROOT set, as on a Debian system bootstrapped that way; then
#     checks the files, their modes and owners (owners are looked up in the root's own
#     /etc/passwd and /etc/group, where the postinst created the user), the conffiles,
#     the man pages and completions, and verifies the unit with `systemd-analyze verify
#     --root`; then purges it and checks that the conffile went with it;
#  4. checks that these checks fail: copies of scm-hub without its unit, with a postinst
#     that creates no user, and with its configuration left world-readable must each be
#     refused.
#
# Installs lintian and systemd (for systemd-analyze, systemd-sysusers, systemd-tmpfiles)
# with apt-get when they are missing. KEEP=1 keeps the work directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

need=()
command -v lintian >/dev/null 2>&1 || need+=(lintian)
for t in systemd-analyze systemd-sysusers systemd-tmpfiles; do
  command -v "$t" >/dev/null 2>&1 || { need+=(systemd); break; }
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing package test tools: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "debian/check.sh: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
if [ "$(id -u)" != 0 ]; then
  echo "debian/check.sh: run as root: dpkg --root must create files owned by the service users" >&2
  exit 1
fi

work=$(mktemp -d)
cleanup() { if [ "${KEEP:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

echo "== build the packages (deploy/debian/build.sh, DEB_PROFILE=${DEB_PROFILE:-dev}) =="
DEB_PROFILE=${DEB_PROFILE:-dev} DEB_OUT_DIR="$work/debs" bash "$here/build.sh"
debs=$work/debs

echo "== lintian =="
# Warnings are shown, errors fail (lintian exits non-zero on --fail-on error).
lintian --fail-on error --suppress-tags no-md5sums-control-file "$debs"/*.deb 2>&1 \
  | grep -v '^running with root privileges' | tee "$work/lintian.out" || {
  echo "debian/check.sh: lintian reported errors (E: lines above)" >&2
  exit 1
}
echo "lintian: $(grep -c '^E:' "$work/lintian.out" || true) errors, $(grep -c '^W:' "$work/lintian.out" || true) warnings"

fail() { echo "debian/check.sh: $*" >&2; return 1; }

# id of a user or group in the test root's own databases.
id_in() { awk -F: -v n="$2" '$1 == n { print $3 }' "$1"; }

# want MODE OWNER GROUP PATH: PATH in the root has that mode and owner (names from the root).
want() {
  local mode=$1 user=$2 group=$3 path=$4 uid gid got
  [ -e "$r$path" ] || fail "$pkg: $path is missing" || return 1
  uid=$(id_in "$r/etc/passwd" "$user")
  gid=$(id_in "$r/etc/group" "$group")
  [ -n "$uid" ] && [ -n "$gid" ] || fail "$pkg: no user $user or group $group in the root" || return 1
  got=$(stat -c '%a %u %g' "$r$path")
  [ "$got" = "$mode $uid $gid" ] || fail "$pkg: $path is '$got', want '$mode $uid ($user) $gid ($group)'"
}

# check_pkg DEB PKG BIN USER UNIT ETC CONF STATE: installs DEB into a fresh root and checks it.
check_pkg() {
  local deb=$1 bin=$3 user=$4 unit=$5 etc=$6 conf=$7 state=$8 page k
  pkg=$2
  r=$(mktemp -d "$work/root-$pkg.XXXX")
  mkdir -p "$r/var/lib/dpkg/updates" "$r/var/lib/dpkg/info" "$r/var/log" "$r/etc"
  touch "$r/var/lib/dpkg/status"
  # What base-passwd (essential) gives every Debian system.
  echo 'root:x:0:0:root:/root:/bin/sh' >"$r/etc/passwd"
  echo 'root:x:0:' >"$r/etc/group"
  # The root stands for a Debian system with systemd (a dependency): its targets are there
  # for systemd-analyze to resolve WantedBy=/After=. libc6 is the host's, hence
  # --force-depends.
  mkdir -p "$r/usr/lib/systemd/system"
  cp /usr/lib/systemd/system/*.target "$r/usr/lib/systemd/system/"
  dpkg --root="$r" --force-depends --force-script-chrootless -i "$deb" >"$r.install.log" 2>&1 \
    || { cat "$r.install.log" >&2; fail "$pkg: dpkg -i failed"; return 1; }

  grep -q "^$user:[^:]*:[0-9]*:[0-9]*:[^:]*:[^:]*:/usr/sbin/nologin$" "$r/etc/passwd" \
    || fail "$pkg: the postinst did not create the system user $user (no login shell)" || return 1
  grep -q "^u $user " "$r/usr/lib/sysusers.d/$pkg.conf" \
    || fail "$pkg: /usr/lib/sysusers.d/$pkg.conf does not declare $user" || return 1

  want 755 root root "/usr/bin/$bin" || return 1
  "$r/usr/bin/$bin" --version | grep -q "^$bin " || fail "$pkg: /usr/bin/$bin --version" || return 1
  want 644 root root "/usr/lib/systemd/system/$unit" || return 1
  want 750 root "$user" "$etc" || return 1
  want 750 root "$user" "$etc/tls" || return 1
  want 640 root "$user" "$etc/$conf" || return 1
  if [ -n "$state" ]; then want 750 "$user" "$user" "$state" || return 1; fi
  dpkg-query --root="$r" -W -f='${Conffiles}\n' "$pkg" | grep -q "^ $etc/$conf " \
    || fail "$pkg: $etc/$conf is not a conffile" || return 1
  # The default configuration parses (no unknown key); only the certificates, which the
  # operator places, may be missing.
  if [ "$bin" = backoffice ]; then set -- --config "$r$etc/$conf" check-config; else set -- check-config --config "$r$etc/$conf"; fi
  "$r/usr/bin/$bin" "$@" >"$r.config" 2>&1 || true
  grep -q -e 'configuration is valid' -e "cannot read CA certificate $etc/tls/ca.pem" "$r.config" \
    || { cat "$r.config" >&2; fail "$pkg: the default $etc/$conf does not parse"; return 1; }

  for page in "$bin" $(cd "$r/usr/share/man/man1" && ls | sed -n "s/^\($bin-[a-z-]*\)\.1\.gz$/\1/p"); do
    want 644 root root "/usr/share/man/man1/$page.1.gz" || return 1
    zcat "$r/usr/share/man/man1/$page.1.gz" | grep -q "^\.TH $page 1" \
      || fail "$pkg: $page.1.gz is not a man page" || return 1
  done
  ls "$r/usr/share/man/man1" | grep -q "^$bin-" \
    || [ "$bin" = machine-agent ] || fail "$pkg: no man pages for the subcommands of $bin" || return 1
  want 644 root root "/usr/share/bash-completion/completions/$bin" || return 1
  want 644 root root "/usr/share/zsh/vendor-completions/_$bin" || return 1
  want 644 root root "/usr/share/fish/vendor_completions.d/$bin.fish" || return 1
  bash -n "$r/usr/share/bash-completion/completions/$bin" \
    || fail "$pkg: the bash completion does not parse" || return 1

  for k in 'ProtectSystem=strict' 'NoNewPrivileges=yes' 'CapabilityBoundingSet=$' "User=$user\$" \
      'Restart=on-failure' "ExecStart=/usr/bin/$bin "; do
    grep -q "^$k" "$r/usr/lib/systemd/system/$unit" || fail "$pkg: $unit lacks $k" || return 1
  done
  # Exit status 0 is not enough: unknown keys are only warned about.
  SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --root="$r" --man=no "$unit" >"$r.verify" 2>&1 \
    || { cat "$r.verify" >&2; fail "$pkg: systemd-analyze verify failed"; return 1; }
  if [ -s "$r.verify" ]; then cat "$r.verify" >&2; fail "$pkg: systemd-analyze verify reported problems"; return 1; fi

  dpkg --root="$r" --force-depends --force-script-chrootless --purge "$pkg" >>"$r.install.log" 2>&1 \
    || { cat "$r.install.log" >&2; fail "$pkg: dpkg --purge failed"; return 1; }
  [ ! -e "$r$etc/$conf" ] && [ ! -e "$r/usr/bin/$bin" ] \
    || fail "$pkg: purge left $etc/$conf or /usr/bin/$bin behind" || return 1
  echo "$pkg: installed into a fresh root, files, modes, owners, conffile, man pages, completions, unit verified, purged"
}

deb_of() { ls "$debs/$1"_*.deb; }
echo "== install each package into a fresh root and check it =="
check_pkg "$(deb_of scm-hub)" scm-hub scm scm-hub scm.service /etc/scm-hub scm.toml /var/lib/scm-hub
check_pkg "$(deb_of scm-machine-agent)" scm-machine-agent machine-agent machine-agent machine-agent.service \
  /etc/machine-agent agent.toml /var/lib/machine-agent
check_pkg "$(deb_of scm-backoffice)" scm-backoffice backoffice scm-backoffice scm-backoffice-watch.service \
  /etc/scm-backoffice backoffice.toml ""

echo "== the checks refuse broken packages =="
# broken NAME EDIT: scm-hub rebuilt after EDIT ran in its unpacked tree (cwd), must be refused.
broken() {
  local name=$1 edit=$2 tree=$work/broken-$1
  dpkg-deb -R "$(deb_of scm-hub)" "$tree"
  (cd "$tree" && eval "$edit")
  dpkg-deb --root-owner-group -b "$tree" "$work/broken-$name.deb" >/dev/null
  if (check_pkg "$work/broken-$name.deb" scm-hub scm scm-hub scm.service /etc/scm-hub scm.toml /var/lib/scm-hub) \
      >"$work/broken-$name.out" 2>&1; then
    cat "$work/broken-$name.out" >&2
    fail "a package $name passed the checks"
    return 1
  fi
  echo "refused as it should be, a package $name: $(grep 'debian/check.sh:' "$work/broken-$name.out" | tail -1)"
}
broken without-its-unit 'rm usr/lib/systemd/system/scm.service'
broken whose-postinst-creates-no-user 'sed -i "/systemd-sysusers/d" DEBIAN/postinst'
broken whose-configuration-stays-world-readable 'sed -i "/scm.toml/d" usr/lib/tmpfiles.d/scm-hub.conf'
echo "debian/check.sh: the Debian packages build, pass lintian without errors, install, and hold what they should"
