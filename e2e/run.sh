#!/usr/bin/env bash
# The end-to-end suite: real mail clients -> xoauth2-proxy -> a private Dovecot that only
# accepts XOAUTH2 (tokens checked against a mock Entra ID), relaying submissions to an
# SMTP sink. Everything runs on loopback, on free ports, in a fresh temporary directory,
# and is started and stopped by this script.
#
#   bash e2e/run.sh                   every scenario
#   bash e2e/run.sh 'imap-*' ...      only the scenarios matching these globs
#   python3 e2e/scenarios.py --list   the scenario names
#
# A private Postfix relays through the proxy (a site's smarthost set-up), mbsync
# pulls a mailbox through it, and a private Prometheus scrapes its admin listener.
# e2e/fleet.py then runs three replicas sharing a private redis-server behind a
# private HAProxy (the fleet-* scenarios).
#
# Environment: E2E_PROXY_BIN=path   use this binary (built with --features legacy-tls)
#                                    instead of `cargo build --release --features legacy-tls`
#              E2E_KEEP=1           keep the work directory (configs, logs, mail) afterwards
#              E2E_DEBUG=1          debug logging in Dovecot and the proxy
#              E2E_PROMETHEUS=0     leave Prometheus out (the metrics-prometheus scenario then fails)
#              E2E_PENDING=a,b      render the world's parts for these pending issue 10
#                                   features (world.PENDING); their scenarios run only when named
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$E2E_DIR")
readonly E2E_DIR REPO_DIR
readonly PACKAGES=(dovecot-imapd dovecot-pop3d dovecot-submissiond openssl curl python3
                  postfix libsasl2-modules isync redis-server haproxy prometheus)

# The scenarios import world.py and harness.py: leave no __pycache__ in the source tree.
export PYTHONDONTWRITEBYTECODE=1

PIDS=()     # everything this script started, in start order
WORK=""
STARTED_AT=$SECONDS

say() { printf '[e2e] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

install_missing_packages() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return
  ((EUID == 0)) || die "missing packages (${missing[*]}): run as root, or install them first"
  say "installing ${missing[*]}"
  apt-get update -qq
  # Debian's postinst would start the system-wide Dovecot where an init system runs;
  # that instance is not ours and does not matter: ours has its own ports and base_dir.
  # Postfix is told "No configuration": its postinst then writes no /etc/postfix/main.cf,
  # so the system-wide Postfix has nothing to start. Ours runs from its own directory.
  # The same goes for Prometheus (it also brings promtool): ours has its own config,
  # data directory and port.
  if [[ " ${missing[*]} " == *" postfix "* ]]; then
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
  fi
  # --no-remove: postfix replaces another MTA (exim4...); that is the admin's decision.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove "${missing[@]}" \
    >/dev/null || die "apt-get could not install ${missing[*]} without removing a package (another MTA?)"
}

build_proxy() {
  if [[ -n ${E2E_PROXY_BIN:-} ]]; then
    PROXY_BIN=$E2E_PROXY_BIN
  else
    say "building the proxy (cargo build --release --features legacy-tls)"
    cargo build --release --quiet --features legacy-tls --manifest-path "$REPO_DIR/Cargo.toml"
    PROXY_BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/xoauth2-proxy
  fi
  [[ -x $PROXY_BIN ]] || die "no proxy binary at $PROXY_BIN"
  # The world has listeners on the legacy TLS profile (world.LEGACY_LISTENERS).
  [[ $("$PROXY_BIN" --version) == *legacy-tls* ]] ||
    die "$PROXY_BIN was built without --features legacy-tls, which the tls-legacy-* listeners need"
}

# A CA and a server certificate for 127.0.0.1, made for this run only. The proxy trusts
# the CA through upstream_ca_file; nothing else on the machine does. The certificate
# deliberately does not name "localhost" (see the upstream-tls-fails scenarios).
make_pki() {
  local dir=$WORK/pki
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj '/CN=xoauth2-proxy e2e CA' -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
    -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj '/CN=localhost' -keyout "$dir/server-key.pem" -out "$dir/server.csr" 2>/dev/null
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days 2 -out "$dir/server.pem" -extfile <(printf '%s\n' \
      'subjectAltName=IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth') 2>/dev/null
  # The proxy's own certificate for its local_tls listeners, by the same CA, for the
  # name Postfix checks (world.PROXY_TLS_NAME) and 127.0.0.1.
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj '/CN=proxy.example.test' -keyout "$dir/proxy-key.pem" -out "$dir/proxy.csr" 2>/dev/null
  openssl x509 -req -in "$dir/proxy.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days 2 -out "$dir/proxy.pem" -extfile <(printf '%s\n' \
      'subjectAltName=DNS:proxy.example.test,IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth') 2>/dev/null
  # The same with an RSA key, for old clients' RSA key exchange: the listeners on the
  # legacy TLS profile (world.LEGACY_LISTENERS) serve it.
  openssl req -new -newkey rsa:2048 -nodes \
    -subj '/CN=proxy.example.test' -keyout "$dir/proxy-rsa-key.pem" -out "$dir/proxy-rsa.csr" 2>/dev/null
  openssl x509 -req -in "$dir/proxy-rsa.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days 2 -out "$dir/proxy-rsa.pem" -extfile <(printf '%s\n' \
      'subjectAltName=DNS:proxy.example.test,IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth') 2>/dev/null
}

# start NAME LOG COMMAND...: runs COMMAND in the background, its output appended to LOG.
start() {
  local name=$1 log=$2
  shift 2
  "$@" >>"$log" 2>&1 &
  PIDS+=("$!")
  say "started $name (pid $!)"
}

# wait_for_port PORT NAME PID LOG: until something accepts on 127.0.0.1:PORT, as long
# as PID lives (and at most 30 s); otherwise show LOG's end and give up.
wait_for_port() {
  local port=$1 name=$2 pid=$3 log=$4 deadline=$((SECONDS + 30))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
      tail -n 30 "$log" >&2
      die "$name is not listening on port $port"
    fi
    sleep 0.1
  done
}

# stop_pid PID: TERM, then KILL after 10 s. Only ever called on PIDs from `start`.
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "pid $pid ignored SIGTERM; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$? i
  trap - EXIT
  # Newest first: the proxy goes before Dovecot, Dovecot before the mock it calls.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[i]}"
  done
  wait 2>/dev/null || true
  if [[ -n $WORK ]]; then
    if ((status == 0)) && [[ -z ${E2E_KEEP:-} ]]; then
      rm -rf "$WORK"
    else
      say "configs and logs kept in $WORK"
    fi
  fi
  say "finished in $((SECONDS - STARTED_AT)) s"
  exit "$status"
}

start_services() {
  local logs=$WORK/logs
  # Prometheus starts first: it needs a second or two, and scrapes the proxy once it is up.
  start_prometheus
  start mock-entra "$logs/mock.log" python3 -u "$E2E_DIR/mock_entra.py" --config "$WORK/mock.json" --port "$PORT_MOCK"
  wait_for_port "$PORT_MOCK" mock-entra "${PIDS[-1]}" "$logs/mock.log"
  start smtp-sink "$logs/sink.log" python3 -u "$E2E_DIR/smtp_sink.py" --port "$PORT_SINK" --dir "$WORK/sink"
  wait_for_port "$PORT_SINK" smtp-sink "${PIDS[-1]}" "$logs/sink.log"

  start_dovecot

  "$PROXY_BIN" check -c "$WORK/proxy.yaml" >/dev/null || die "the proxy rejects $WORK/proxy.yaml"
  start xoauth2-proxy "$logs/proxy.log" "$PROXY_BIN" run -c "$WORK/proxy.yaml"
  for port in "$PORT_PROXY_IMAP" "$PORT_PROXY_POP3" "$PORT_PROXY_SMTP"; do
    wait_for_port "$port" xoauth2-proxy "${PIDS[-1]}" "$logs/proxy.log"
  done

  start_postfix
  if [[ ${E2E_PROMETHEUS:-1} != 0 ]]; then
    wait_for_port "$PORT_PROMETHEUS" prometheus "$PROMETHEUS_PID" "$logs/prometheus.log"
  fi
}

# This run's Dovecot (WORK/dovecot), in the foreground so that its pid is ours.
start_dovecot() {
  local dovecot_conf=$WORK/dovecot/dovecot.conf port
  doveconf -c "$dovecot_conf" -n >/dev/null || die "Dovecot rejects $dovecot_conf"
  start dovecot "$WORK/logs/dovecot.log" dovecot -F -c "$dovecot_conf"
  for port in "$PORT_IMAPS" "$PORT_POP3S" "$PORT_SUBMISSION"; do
    wait_for_port "$port" dovecot "${PIDS[-1]}" "$WORK/logs/dovecot.log"
  done
}

# A private Prometheus (WORK/prometheus: world.py's prometheus.yml, its TSDB in data/) on
# its own loopback port, scraping the proxy's admin listener every second.
start_prometheus() {
  local dir=$WORK/prometheus
  touch "$WORK/logs/prometheus.log"
  [[ ${E2E_PROMETHEUS:-1} == 0 ]] && return 0
  promtool check config "$dir/prometheus.yml" >/dev/null || die "promtool rejects $dir/prometheus.yml"
  start prometheus "$WORK/logs/prometheus.log" prometheus --config.file="$dir/prometheus.yml" \
    --storage.tsdb.path="$dir/data" --storage.tsdb.retention.time=1h \
    --web.listen-address="127.0.0.1:$PORT_PROMETHEUS" --log.level=warn
  PROMETHEUS_PID=${PIDS[-1]}
}

# `postfix check` makes the private queue's subdirectories (it wants the queue itself
# owned by root, the data directory by the postfix user) and checks the configuration.
# It runs postconf once per directory, about 1.5 s, so it runs while the others start.
prepare_postfix() {
  install -d -m 755 "$WORK/postfix/queue"
  install -d -m 700 -o postfix -g postfix "$WORK/postfix/data"
  postfix -c "$WORK/postfix/etc" check >>"$WORK/logs/postfix.log" 2>&1
}

# Postfix's master in the foreground with our config directory (-c): our child, stopped
# by its pid like the rest; it stops its own daemons.
start_postfix() {
  local etc=$WORK/postfix/etc logs=$WORK/logs
  wait "$POSTFIX_PREPARED" || die "Postfix rejects $etc (see $logs/postfix.log)"
  start postfix "$logs/postfix.log" "$(postconf -c "$etc" -h daemon_directory)/master" -c "$etc" -s
  wait_for_port "$PORT_POSTFIX" postfix "${PIDS[-1]}" "$logs/postfix.log"
}

main() {
  install_missing_packages
  build_proxy
  WORK=$(mktemp -d -t xoauth2-proxy-e2e.XXXXXX)
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  # Dovecot's unprivileged processes (dovenull, dovecot, and nobody for the mail) must
  # be able to reach their files below the otherwise private temporary directory.
  chmod 755 "$WORK"
  mkdir -p "$WORK/logs" "$WORK/mail" "$WORK/sink"
  chown nobody:nogroup "$WORK/mail"
  make_pki
  python3 "$E2E_DIR/world.py" configure "$WORK" "$PROXY_BIN"
  # shellcheck source=/dev/null
  source "$WORK/ports.env"
  prepare_postfix &
  POSTFIX_PREPARED=$!
  start_services
  say "environment ready after $((SECONDS - STARTED_AT)) s; running scenarios"
  # fleet-* scenarios (e2e/fleet.py: three replicas, Redis, HAProxy) run after the others,
  # against the same Dovecot and mock; a glob starting with "fleet" selects only them.
  local main_patterns=() fleet_patterns=() pattern status=0
  for pattern in "$@"; do
    if [[ $pattern == fleet* ]]; then fleet_patterns+=("$pattern"); else main_patterns+=("$pattern"); fi
  done
  if (($# == 0 || ${#main_patterns[@]} > 0)); then
    python3 "$E2E_DIR/scenarios.py" --env "$WORK/env.json" "${main_patterns[@]}" || status=$?
  fi
  if (($# == 0 || ${#fleet_patterns[@]} > 0)); then
    # The final phase (upstream-down-*) stops Dovecot; the fleet needs it again.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$PORT_IMAPS") 2>/dev/null; then
      say "starting Dovecot again for the fleet-* scenarios (the final phase stopped it)"
      start_dovecot
    fi
    python3 "$E2E_DIR/fleet.py" --env "$WORK/env.json" "${fleet_patterns[@]}" || status=$?
  fi
  return "$status"
}

main "$@"
