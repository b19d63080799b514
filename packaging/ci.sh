#!/usr/bin/env bash
# Packaging checks, run by .ci/run after its one release build (or alone):
#   1. the Debian package: `cargo deb --no-build` from the release binary already
#      built, its contents, `dpkg -i`, the installed binary checking the installed
#      config, ownership, `dpkg -r` and `dpkg --purge` and what each leaves;
#   2. the systemd unit as installed: `systemd-analyze verify`, the exposure score
#      of `systemd-analyze security --offline=yes`, and the service started as
#      systemd would (its user, a notify socket, a watchdog), with every system
#      call it makes checked against the unit's SystemCallFilter=, and its
#      admin listener's /healthz and /readyz probed;
#   3. the Kubernetes example against the Kubernetes schemas (kubernetes-validate);
#   4. the container image (packaging/container/build.sh), where a builder can run.
# It ends with the figures (package size, idle RSS, exposure score, outcomes).
#
# Needs root (dpkg -i, a system user). Installs what it lacks with apt-get, pip
# (in a cached virtualenv) and cargo install (cached in ~/.cargo/bin).
#
#   bash packaging/ci.sh
#   PACKAGING_BIN=path        the release binary (default target/release/xoauth2-proxy)
#   PACKAGING_SKIP_CONTAINER=1  leave out step 4
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PKG=xoauth2-proxy USER_NAME=xoauth2-proxy
readonly CONF=/etc/xoauth2-proxy/config.yaml STATE=/var/lib/xoauth2-proxy
readonly CARGO_DEB_VERSION=3.8.0 KUBERNETES_VALIDATE_VERSION=1.37.0 KUBERNETES_VERSION=1.33
BIN=${PACKAGING_BIN:-target/release/xoauth2-proxy}
WORK=$(mktemp -d -t xoauth2-proxy-packaging.XXXXXX)
PIDS=()
FIGURES=()

say() { printf '[packaging] %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
figure() { FIGURES+=("$1: $2"); say "$1: $2"; }
# expect WHAT COMMAND...: the command must succeed.
expect() {
  local what=$1
  shift
  "$@" >/dev/null 2>&1 || die "$what ($*)"
  say "ok: $what"
}

cleanup() {
  local status=$? i
  trap - EXIT
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[i]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
  if ((${#FIGURES[@]})); then
    printf '\n[packaging] figures\n' >&2
    printf '  %s\n' "${FIGURES[@]}" >&2
  fi
  exit "$status"
}
trap cleanup EXIT

((EUID == 0)) || die "run as root: this installs and removes the package"
[[ -x $BIN ]] || die "no release binary at $BIN (cargo build --release --locked --features legacy-tls --bin xoauth2-proxy)"

install_tools() {
  local want=(systemd man-db python3-venv xz-utils binutils adduser strace) missing=() pkg
  for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Without its lzma feature cargo-deb compresses with the system's xz: no liblzma-dev needed.
  if [[ $(cargo deb --version 2>/dev/null) != *"$CARGO_DEB_VERSION"* ]]; then
    say "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --locked --no-default-features --version "$CARGO_DEB_VERSION" --quiet
  fi
}

build_deb() {
  DEB=$(PACKAGING_BIN=$BIN bash packaging/deb.sh | tail -n 1)
  [[ -f $DEB ]] || die "cargo deb did not produce a package"
  say "built $DEB"
  dpkg-deb --info "$DEB" | sed -n '/Package:/,$p' >&2
  say "contents:"
  dpkg-deb --contents "$DEB" >&2
  figure "package size" "$(($(stat -c %s "$DEB") / 1024)) KiB ($(basename "$DEB")), installed $(dpkg-deb -f "$DEB" Installed-Size) KiB"
}

status_of() { dpkg-query -W -f='${db:Status-Abbrev}' "$PKG" 2>/dev/null || echo "not known"; }
mode_owner() { stat -c '%a %U %G' "$1"; }

check_installed() {
  expect "the binary is in /usr/bin" test -x /usr/bin/xoauth2-proxy
  [[ $(status_of) == "ii "* ]] || die "dpkg status is '$(status_of)'"
  expect "system user $USER_NAME exists" getent passwd "$USER_NAME"
  [[ $(getent passwd "$USER_NAME" | cut -d: -f6,7) == "$STATE:/usr/sbin/nologin" ]] \
    || die "user $USER_NAME: $(getent passwd "$USER_NAME")"
  [[ $(mode_owner "$STATE") == "700 $USER_NAME $USER_NAME" ]] || die "$STATE is $(mode_owner "$STATE")"
  [[ $(mode_owner "$CONF") == "640 root $USER_NAME" ]] || die "$CONF is $(mode_owner "$CONF")"
  [[ $(mode_owner /etc/xoauth2-proxy) == "750 root $USER_NAME" ]] || die "/etc/xoauth2-proxy is $(mode_owner /etc/xoauth2-proxy)"
  dpkg-query -W -f='${Conffiles}' "$PKG" | grep -q " $CONF " || die "$CONF is not a conffile"
  say "ok: $STATE, $CONF and /etc/xoauth2-proxy have the modes and owners the service needs; $CONF is a conffile"
  UNIT=$(dpkg -L "$PKG" | grep '/systemd/system/xoauth2-proxy.service$')
  expect "the man page is found" man -w xoauth2-proxy
  expect "the reload man page is found" man -w xoauth2-proxy-reload
  expect "bash completion" test -s /usr/share/bash-completion/completions/xoauth2-proxy
  expect "zsh completion" test -s /usr/share/zsh/vendor-completions/_xoauth2-proxy
  expect "fish completion" test -s /usr/share/fish/vendor_completions.d/xoauth2-proxy.fish
  say "installed check on the installed config, as root and as the service user:"
  /usr/bin/xoauth2-proxy check -c "$CONF" >&2 || die "check refuses the shipped $CONF"
  setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups /usr/bin/xoauth2-proxy check -c "$CONF" >/dev/null \
    || die "the service user cannot read $CONF"
  # The shipped config must not listen beyond loopback nor need a secret.
  if grep -v '^\s*#' "$CONF" | grep -Eq 'bind:\s*"?(0\.0\.0\.0|\[::\])|\$\{'; then
    die "$CONF listens beyond loopback or needs a variable"
  fi
}

check_unit() {
  say "systemd-analyze verify $UNIT"
  systemd-analyze verify "$UNIT" || die "systemd-analyze verify"
  local security
  security=$(systemd-analyze security --offline=yes "$UNIT" 2>&1) || true
  printf '%s\n' "$security" | tail -n 25 >&2
  local score
  score=$(printf '%s\n' "$security" | sed -n 's/.*Overall exposure level for [^:]*: *//p' | tail -n 1)
  [[ -n $score ]] || die "no exposure score from systemd-analyze security --offline=yes"
  figure "systemd-analyze security --offline=yes exposure" "$score (0 = fully sandboxed, 10 = exposed)"
}

# The service started as its unit would start it (minus the namespaces only
# systemd can set up): as the service user, with NOTIFY_SOCKET and
# WATCHDOG_USEC, under strace to collect its system calls.
run_like_systemd() {
  local run=$WORK/run
  mkdir -p "$run"
  chmod 755 "$WORK"
  chown "$USER_NAME:$USER_NAME" "$run"
  python3 - "$run/notify" "$WORK/notify.log" <<'PY' &
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o777)
with open(log, "a", buffering=1) as out:
    while True:
        out.write(s.recv(4096).decode().replace("\n", " ").strip() + "\n")
PY
  PIDS+=("$!")
  local i
  for ((i = 0; i < 50; i++)); do [[ -S $run/notify ]] && break; sleep 0.1; done
  # strace runs as the service user too, so it records the proxy's calls, not setpriv's.
  local tracer=()
  if strace -f -qq -o /dev/null true 2>/dev/null; then
    tracer=(strace -f -qq -o "$run/strace" --)
  else
    say "strace cannot trace here (no ptrace): the system call check is skipped"
  fi
  NOTIFY_SOCKET=$run/notify WATCHDOG_USEC=2000000 \
    setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups --inh-caps=-all \
    "${tracer[@]}" /usr/bin/xoauth2-proxy run -c "$CONF" --pid-file "$run/pid" >"$WORK/proxy.log" 2>&1 &
  PIDS+=("$!")
  wait_for_notify "READY=1" 1
  local pid
  pid=$(cat "$run/pid")
  say "ok: READY=1 from pid $pid: $(grep -m1 'READY=1' "$WORK/notify.log")"
  wait_for_notify "WATCHDOG=1" 1
  say "ok: watchdog pings arrive"
  # The shipped config's admin listener, as the container's HEALTHCHECK and the
  # Kubernetes probes ask it (with the installed binary's own probe command).
  /usr/bin/xoauth2-proxy probe http://127.0.0.1:9464/healthz >&2 || die "/healthz of the installed service"
  /usr/bin/xoauth2-proxy probe http://127.0.0.1:9464/readyz >&2 || die "/readyz of the installed service"
  say "ok: /healthz and /readyz answer 200"
  sleep 2
  figure "idle RSS of the installed proxy (shipped config, 3 listeners, admin listener)" "$(awk '/^VmRSS/ {print $2, $3}' "/proc/$pid/status")"
  figure "open files of the idle proxy" "$(find "/proc/$pid/fd" -mindepth 1 | wc -l) (limit: $(awk '/Max open files/ {print $4}' "/proc/$pid/limits"))"
  # ExecReload, as the unit runs it.
  setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups \
    /usr/bin/xoauth2-proxy reload -c "$CONF" --pid "$pid" >&2 || die "reload as ExecReload runs it"
  wait_for_notify "RELOADING=1" 1
  wait_for_notify "READY=1" 2
  say "ok: RELOADING=1 then READY=1 around the reload"
  kill -TERM "$pid"
  wait_for_notify "STOPPING=1" 1
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && die "the proxy did not stop on SIGTERM"
  say "ok: STOPPING=1, and the proxy exited"
  for ((i = 0; i < 50; i++)); do kill -0 "${PIDS[-1]}" 2>/dev/null || break; sleep 0.1; done
  [[ -s $run/strace ]] && check_syscalls "$run/strace"
  return 0
}

# wait_for_notify MESSAGE N: until MESSAGE has arrived N times (10 s at most).
wait_for_notify() {
  local i
  for ((i = 0; i < 100; i++)); do
    (($(grep -c -- "$1" "$WORK/notify.log" 2>/dev/null || true) >= $2)) && return 0
    sleep 0.1
  done
  cat "$WORK/notify.log" "$WORK/proxy.log" >&2 || true
  die "no $1 (x$2) from the proxy"
}

# Every system call the proxy made (strace -f) must pass the unit's filter,
# SystemCallFilter=@system-service minus ~@privileged @resources.
check_syscalls() {
  systemd-analyze syscall-filter >"$WORK/groups" 2>/dev/null || true
  sed -E -n 's/^[0-9]+ +([a-z0-9_]+)\(.*/\1/p' "$1" | sort -u >"$WORK/used"
  python3 - "$WORK/groups" "$WORK/used" <<'PY' || die "the proxy makes system calls the unit's filter refuses"
import sys
groups, current = {}, None
for line in open(sys.argv[1]):
    if not line.strip() or line.strip().startswith("#"):
        continue
    if not line.startswith(" "):
        current = line.strip()
        groups[current] = set()
    elif current:
        groups[current].add(line.strip())
def expand(name, seen=()):
    out = set()
    for member in groups.get(name, ()):
        out |= expand(member, seen + (name,)) if member.startswith("@") and member not in seen else {member}
    return out
allowed = expand("@system-service") - expand("@privileged") - expand("@resources")
used = {l.strip() for l in open(sys.argv[2]) if l.strip()}
refused = sorted(used - allowed)
print(f"[packaging] {len(used)} distinct system calls seen; outside the filter: {refused or 'none'}", file=sys.stderr)
sys.exit(1 if refused else 0)
PY
  figure "system calls of the proxy under strace" "$(wc -l <"$WORK/used") distinct, all allowed by the unit's SystemCallFilter="
}

check_ownership() {
  # Root is sent to the service user for files the service must read...
  local out
  if out=$(/usr/bin/xoauth2-proxy gen-cert --out "$STATE/tls" 2>&1); then
    die "root could write a key into $STATE"
  fi
  [[ $out == *"sudo -u $USER_NAME /usr/bin/xoauth2-proxy gen-cert --out $STATE/tls"* ]] || die "unexpected refusal: $out"
  say "ok: root is refused in $STATE and told: ${out##*: }"
  # ...and as that user it works, leaving files only the service reads.
  setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups \
    /usr/bin/xoauth2-proxy gen-cert --out "$STATE/tls" >/dev/null || die "gen-cert as $USER_NAME"
  [[ $(mode_owner "$STATE/tls/local-key.pem") == "600 $USER_NAME $USER_NAME" ]] \
    || die "key is $(mode_owner "$STATE/tls/local-key.pem")"
  say "ok: gen-cert as $USER_NAME wrote a key only the service reads"
}

check_removed() {
  dpkg -r "$PKG" >&2
  [[ $(status_of) == "rc "* ]] || die "after dpkg -r the status is '$(status_of)', not rc (config-files)"
  expect "dpkg -r removed the binary" test ! -e /usr/bin/xoauth2-proxy
  expect "dpkg -r removed the unit" test ! -e "$UNIT"
  expect "dpkg -r kept the conffile" test -f "$CONF"
  expect "dpkg -r kept the token store" test -d "$STATE/tls"
  expect "dpkg -r kept the system user" getent passwd "$USER_NAME"
  dpkg --purge "$PKG" >&2
  [[ $(status_of) != "rc "* && $(status_of) != "ii "* ]] || die "after --purge the status is '$(status_of)'"
  expect "dpkg --purge removed the conffile" test ! -e "$CONF"
  expect "dpkg --purge removed /etc/xoauth2-proxy" test ! -e /etc/xoauth2-proxy
  expect "dpkg --purge removed the token store" test ! -e "$STATE"
  expect "dpkg --purge kept the system user (Debian practice)" getent passwd "$USER_NAME"
}

validate_kubernetes() {
  local venv=${XDG_CACHE_HOME:-$HOME/.cache}/xoauth2-proxy-ci/venv
  if [[ ! -x $venv/bin/kubernetes-validate ]] \
    || [[ $("$venv/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p') != "$KUBERNETES_VALIDATE_VERSION" ]]; then
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (it bundles the schemas)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  "$venv/bin/kubernetes-validate" --strict --kubernetes-version "$KUBERNETES_VERSION" packaging/kubernetes/*.yaml >&2 \
    || die "packaging/kubernetes does not match the Kubernetes $KUBERNETES_VERSION schemas"
  figure "Kubernetes example" "valid against the Kubernetes $KUBERNETES_VERSION schemas (kubernetes-validate --strict)"
}

main() {
  if [[ $(status_of) == "ii "* || $(status_of) == "rc "* ]]; then
    [[ ${CI:-} == true ]] || die "$PKG is already installed here; this script installs and purges it (set CI=true to allow)"
    say "purging the $PKG left by an earlier run"
    dpkg --purge "$PKG" >&2
  fi
  install_tools
  build_deb
  dpkg -i "$DEB" >&2
  check_installed
  check_unit
  run_like_systemd
  check_ownership
  check_removed
  validate_kubernetes
  if [[ -z ${PACKAGING_SKIP_CONTAINER:-} ]]; then
    local outcome
    outcome=$(bash packaging/container/build.sh "$BIN" | tail -n 1) || die "container build: $outcome"
    figure "container image" "$outcome"
  fi
  say "all packaging checks passed"
}

main "$@"
