#!/usr/bin/env python3
"""The e2e suite's test world, defined once: tenant, app registrations, accounts.

The mock Entra's clients, the proxy's identities and accounts, and the logins the
scenarios make are all derived from the tables below, so they cannot drift apart.

    python3 e2e/world.py configure WORK_DIR PROXY_BIN

picks free loopback ports and writes, under WORK_DIR, everything one run needs:
mock.json, proxy.yaml, dovecot/{dovecot.conf,oauth2-*.conf.ext}, postfix/{main.cf,
master.cf,sasl_passwd,...} (the site relay), mbsync/*.rc (one per mbsync scenario),
check-*.yaml (small configs the check-* scenarios diagnose with `check --online`),
prometheus/prometheus.yml (a Prometheus scraping the proxy's admin listener every
second), env.json (what the scenarios read) and ports.env (what e2e/run.sh sources).
"""

import json
import os
import secrets
import socket
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TENANT = "7d3b1c9e-5a2f-4e8b-9c1d-e2e0e2e0e2e0"
DOMAIN = "example.test"
DOVECOT_CLIENT_ID = "dovecot-passdb"
# The public client of the delegated (device code + refresh token) flows: the proxy's
# "delegated" identity, and the mock-* self-checks.
DELEGATED_CLIENT_ID = "e2e-delegated"


@dataclass(frozen=True)
class Identity:
    """An app registration: a client at the mock, an `identities` entry in the proxy."""

    name: str
    lifetime: int = 3600  # seconds the mock's tokens live
    min_token_lifetime: str = "10m"
    token_timeout: str = "10s"
    reachable: bool = True  # False: the authority is a port nobody listens on
    permitted: bool = True  # False: the app has no permission on its mailboxes
    flow: str = "client_credentials"  # or refresh_token: a public client, signed in with `login`
    roles: tuple[str, ...] | None = None  # the application permissions in its tokens (None: all three)

    @property
    def delegated(self) -> bool:
        return self.flow == "refresh_token"

    @property
    def client_id(self) -> str:
        return DELEGATED_CLIENT_ID if self.delegated else f"e2e-{self.name}"

    @property
    def secret(self) -> str:
        return f"{self.name}~Secret.{self.name[::-1]}_0123456789"


@dataclass(frozen=True)
class Account:
    """A local login of the proxy and the mailbox it reaches."""

    username: str
    identity: str
    smtp_user: str | None = None  # XOAUTH2 user= for SMTP, when not the mailbox
    hashed: bool = False  # store an argon2 hash (from `hash-password`) instead of the password
    secret: str | None = None  # a password of its own, instead of the generated one

    @property
    def password(self) -> str:
        if self.secret is not None:
            return self.secret
        # Spaces, quotes and a backslash: IMAP quoting and POP3's PASS (rest of the line)
        # must carry them. ASCII only, because imaplib and smtplib encode logins as ASCII.
        return f"pw-{self.username} \"quoted\" \\ 7"

    @property
    def mailbox(self) -> str:
        return f"{self.username}@{DOMAIN}"


IDENTITIES = {i.name: i for i in [
    Identity("main"),
    # One token serves min(10s, 60s/2) short of its 60 s: ~50 s per token request.
    Identity("ticker", lifetime=60, min_token_lifetime="10s"),
    Identity("revoke"),
    # One identity per token-endpoint fault: a failure puts an identity in its backoff,
    # during which logins share the failure without asking the endpoint again.
    Identity("faulty", token_timeout="2s"),
    Identity("slowpoke", token_timeout="2s"),
    Identity("grantless", token_timeout="2s"),
    Identity("unreachable", reachable=False, token_timeout="2s"),
    Identity("denied", permitted=False),
    Identity("throttled"),
    # Like ticker, for token-endpoint-down-valid-token (opt-in: it shows a proxy bug).
    Identity("margin", lifetime=60, min_token_lifetime="10s"),
    Identity("burst"),
    Identity("never"),
    # Delegated: 30 s tokens, so the scenario sees refresh tokens rotate a few times.
    Identity("delegated", lifetime=30, min_token_lifetime="5s", flow="refresh_token"),
    # `check --online` diagnoses these: a correct registration, and one whose admin
    # forgot POP.AccessAsApp.
    Identity("doctor"),
    Identity("doctor-norole", roles=("IMAP.AccessAsApp", "SMTP.SendAsApp")),
    # The fleet-* scenarios (e2e/fleet.py): three replicas sharing one Redis. fleetfirst
    # gets no token before fleet-first-logins; fleetdel is delegated, with 30 s tokens.
    Identity("fleet"),
    Identity("fleetfirst"),
    Identity("fleetdel", lifetime=30, min_token_lifetime="5s", flow="refresh_token"),
]}

ACCOUNTS = {a.username: a for a in [
    Account("alice", "main", hashed=True),
    Account("popper", "main"),
    Account("popauth", "main"),
    Account("popcurl", "main"),
    # A shared mailbox: IMAP/POP3 open it, SMTP logs in as the delegate with Send As.
    Account("sales", "main", smtp_user=f"sender@{DOMAIN}"),
    Account("ticker", "ticker"),
    Account("revokee", "revoke"),
    Account("faulty", "faulty"),
    Account("slowpoke", "slowpoke"),
    Account("grantless", "grantless"),
    Account("stranded", "unreachable"),
    Account("denied", "denied"),
    Account("throttled", "throttled"),
    Account("margin", "margin"),
    Account("burst", "burst"),
    Account("never", "never"),
    Account("delegate", "delegated"),
    # The site relay's login (Postfix's smtp_sasl_password_maps): a password with every
    # awkward character, as admins paste them into sasl_passwd.
    Account("relay", "main", secret="relay ~ \"pass\" \\ wörd €"),
    # One mailbox per mbsync scenario, so each knows exactly what INBOX holds.
    Account("mbsync-login", "main"),
    Account("mbsync-plain", "main"),
    Account("mbsync-starttls", "main"),
    Account("mbsync-imaps", "main"),
    # The scenarios of issue 10 features still pending (see PENDING): a printer on the
    # wrong port or an old TLS stack, a CRM's pool of senders, a collector's connections.
    Account("printer", "main"),
    Account("crm", "main"),
    Account("collector", "main"),
    # The quirk-* scenarios: `~`, `"`, `\` and runs of spaces in ASCII; the same with
    # non-ASCII letters (UTF-8 on the wire), hashed to cover argon2 with UTF-8 input.
    Account("quirky", "main", secret="~tilde \"quo ted\" back\\slash \\\\ two  spaces ~"),
    Account("unicode", "main", hashed=True, secret="Pässwörd ~ \"ünï\" \\ 日本語 €"),
    Account("doc", "doctor", smtp_user=f"docsender@{DOMAIN}"),
    Account("docnorole", "doctor-norole"),
    # The metrics-* scenario's logins, on listeners of their own (kind "metrics"), so the
    # counters Prometheus reads move by exactly its logins while other scenarios run.
    Account("metrics", "main", secret="metrics-pass-7"),
    # fleet-*: one account per scenario, so each counts only its own sessions.
    Account("fleet", "fleet"),
    Account("fleetfirst", "fleetfirst"),
    Account("fleetsend", "fleet"),
    Account("fleetbad", "fleet"),
    Account("fleetkill", "fleet"),
    Account("fleetdel", "fleetdel"),
]}

# The configs check-* scenarios run `check --online` with: name -> (identity, account,
# tenant as configured, client secret as configured or None for the right one).
CHECK_CONFIGS = {
    "good": ("doctor", "doc", TENANT, None),
    "norole": ("doctor-norole", "docnorole", TENANT, None),
    "wrong-secret": ("doctor", "doc", TENANT, "the-secret-id-not-its-value"),
    "unknown-tenant": ("doctor", "doc", "nosuch.example.test", None),
}

PROTOCOLS = {"imap": ("imaps", "implicit"), "pop3": ("pop3s", "implicit"), "smtp": ("submission", "starttls")}


def proxy_port_name(kind: str, protocol: str) -> str:
    return f"proxy_{kind}_{protocol}" if kind else f"proxy_{protocol}"


# Six listeners per protocol, all in front of the same Dovecot: the ones most scenarios
# use; "cold" ones that get no session before Dovecot is stopped (upstream-down);
# "badtls" ones that reach Dovecot as "localhost", a name its certificate does not carry;
# "starttls" and "implicit" ones with that `local_tls` (Postfix and mbsync over TLS);
# "metrics" ones only the metrics-prometheus scenario logs in to.
LISTENER_KINDS = {"": HOST, "cold": HOST, "badtls": "localhost", "starttls": HOST, "implicit": HOST,
                  "metrics": HOST}
LOCAL_TLS = {"starttls": "starttls", "implicit": "implicit"}  # kind -> local_tls, where not none
# The name the proxy's own certificate carries (besides IP 127.0.0.1): Postfix checks
# it with `smtp_tls_policy_maps ... secure match=`.
PROXY_TLS_NAME = "proxy.example.test"

# Issue 10 features the proxy does not have yet, with what the scenarios testing them
# need from the world: listeners of their own (kind -> protocols, extra lines) and
# top-level lines. `check` rejects these keys today, so a feature's part is rendered
# only when E2E_PENDING (comma-separated) names it, and its scenarios are registered off
# by default (scenarios.py, `pending=`). The key names are placeholders: when the
# feature lands, use its real keys here, move them into the default world, and turn the
# scenarios on.
PENDING = {
    # The extra `250-AUTH=PLAIN LOGIN` line (Postfix's broken_sasl_auth_clients).
    "auth-equals-line": {"listeners": {"authequals": (["smtp"], ["    broken_sasl_auth_clients: true"])}},
    # Implicit TLS or plain text/STARTTLS on one port, by the client's first bytes.
    "local-tls-auto": {"listeners": {"auto": (list(PROTOCOLS), ["    local_tls: auto"])}},
    # A ClientHello on a plaintext port, plain text on an implicit-TLS one: recognised
    # and closed at once (the default listeners and the "implicit" ones suffice).
    "tls-sniffing": {},
    # A pre-auth line that never ends is answered and closed once it passes a bound.
    "overlong-line-bound": {},
    # Per-protocol caps per mailbox with Microsoft's defaults, and waiting for a slot.
    "per-protocol-caps": {"top": ["max_sessions_per_mailbox: {smtp: 3, imap: 20, pop3: 20}",
                                  "session_wait: 20s"]},
}
# The PENDING features the proxy has now: their world parts are always rendered and
# their scenarios run by default.
LANDED = {"tls-sniffing", "overlong-line-bound", "local-tls-auto", "auth-equals-line", "per-protocol-caps"}

# Listeners on the legacy TLS profile (OpenSSL: TLS 1.0/1.1 and RSA key exchange, for
# old printers), each with its own RSA certificate (run.sh makes proxy-rsa.pem; RSA key
# exchange needs one), while the other TLS listeners keep the ECDSA one: kind ->
# (protocols, local_tls).
LEGACY_LISTENERS = {"legacy": (["imap"], "implicit"), "legacystarttls": (["imap", "smtp"], "starttls")}


def legacy_lines(kind: str, pki: Path) -> list[str]:
    return [f"    local_tls: {LEGACY_LISTENERS[kind][1]}", "    local_tls_profile: legacy", "    tls:",
            f"      cert_file: {yaml_str(str(pki / 'proxy-rsa.pem'))}",
            f"      key_file: {yaml_str(str(pki / 'proxy-rsa-key.pem'))}"]


PENDING_KINDS = {kind: feature for feature, part in PENDING.items() for kind in part.get("listeners", {})}
# Prometheus scrapes the proxy's admin listener this often (and times out after it).
SCRAPE_INTERVAL = "1s"
PROMETHEUS_JOB = "xoauth2-proxy"
PORT_NAMES = ["mock", "sink", "imaps", "pop3s", "submission", "closed", "postfix", "admin", "prometheus",
              *[proxy_port_name(kind, protocol) for kind in LISTENER_KINDS for protocol in PROTOCOLS],
              *[proxy_port_name(kind, protocol) for kind, (protocols, _) in LEGACY_LISTENERS.items()
                for protocol in protocols],
              *[proxy_port_name(kind, protocol) for part in PENDING.values()
                for kind, (protocols, _) in part.get("listeners", {}).items() for protocol in protocols]]


def pending_enabled() -> list[str]:
    """The PENDING features E2E_PENDING names (unknown names are an error)."""
    names = [name for name in os.environ.get("E2E_PENDING", "").split(",") if name]
    unknown = sorted(set(names) - set(PENDING))
    if unknown:
        sys.exit(f"E2E_PENDING names unknown features {unknown}; known: {sorted(PENDING)}")
    return sorted(set(names) | LANDED)

# The site relay: senders Postfix routes to a proxy listener other than its relayhost
# (sender_dependent_default_transport_maps), each showing one way to reach the proxy.
# relayhost itself is the plain SMTP listener, where Postfix picks AUTH PLAIN.
POSTFIX_ROUTES = {
    # sender -> (master.cf transport, listener kind, smtp_tls_policy_maps entry or None)
    f"relay-login@{DOMAIN}": ("e2e-login", "", None),
    f"relay-starttls@{DOMAIN}": ("smtp", "starttls", f"secure match={PROXY_TLS_NAME}"),
}
POSTFIX_RELAYHOST_SENDER = f"relay@{DOMAIN}"


def free_ports(count: int) -> list[int]:
    """Ports the kernel considers free now; all held open together so they differ."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def yaml_str(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def hash_password(proxy_bin: str, password: str) -> str:
    result = subprocess.run([proxy_bin, "hash-password"], input=password + "\n", capture_output=True,
                            text=True, check=True, timeout=60)
    return result.stdout.strip()


def mock_config(dovecot_secret: str) -> dict:
    clients = {}
    for identity in IDENTITIES.values():
        if identity.delegated:
            continue
        mailboxes = [] if not identity.permitted else [
            mailbox for a in ACCOUNTS.values() if a.identity == identity.name
            for mailbox in (a.mailbox, a.smtp_user) if mailbox]
        clients[identity.client_id] = {"secret": identity.secret, "lifetime": identity.lifetime,
                                       "mailboxes": mailboxes}
        if identity.roles is not None:
            clients[identity.client_id]["roles"] = list(identity.roles)
    clients[DELEGATED_CLIENT_ID] = {"public": True, "lifetime": IDENTITIES["delegated"].lifetime,
                                    "device_interval": 1}
    return {"tenant": TENANT, "domain": DOMAIN, "clients": clients,
            "dovecot_client": {"id": DOVECOT_CLIENT_ID, "secret": dovecot_secret}}


def listener(ports: dict, kind: str, protocol: str, upstream_host: str = HOST) -> list[str]:
    upstream, tls = PROTOCOLS[protocol]
    lines = [f"  - name: e2e-{kind + '-' if kind else ''}{protocol}",
             f"    protocol: {protocol}",
             f"    bind: {HOST}:{ports[proxy_port_name(kind, protocol)]}",
             f"    upstream: {upstream_host}:{ports[upstream]}",
             f"    upstream_tls: {tls}",
             "    upstream_timeout: 10s"]
    if not kind:
        # Every client is 127.0.0.1, and caps-imap-50-connections-wait opens 50 at once
        # while other scenarios use the same listener: the default per-address cap (50)
        # would turn one of them away.
        lines.append("    max_connections_per_ip: 200")
    if kind in LOCAL_TLS:
        lines.append(f"    local_tls: {LOCAL_TLS[kind]}")
    return lines


def proxy_config(ports: dict, pki: Path, store: Path, proxy_bin: str, debug: bool, pending: list[str]) -> str:
    lines = ["# xoauth2-proxy configuration for one e2e run, written by e2e/world.py.", "listeners:"]
    for kind, upstream_host in LISTENER_KINDS.items():
        for protocol in PROTOCOLS:
            lines += listener(ports, kind, protocol, upstream_host)
    for kind, (protocols, _) in LEGACY_LISTENERS.items():
        for protocol in protocols:
            lines += listener(ports, kind, protocol) + legacy_lines(kind, pki)
    for feature in pending:
        for kind, (protocols, extra) in PENDING[feature].get("listeners", {}).items():
            for protocol in protocols:
                lines += listener(ports, kind, protocol)
                lines += [string.Template(line).substitute(pki=pki) for line in extra]
    lines += [f"upstream_ca_file: {yaml_str(str(pki / 'ca.pem'))}",
              # The proxy's own certificate for local_tls, from the run's CA (run.sh).
              "tls:", f"  cert_file: {yaml_str(str(pki / 'proxy.pem'))}",
              f"  key_file: {yaml_str(str(pki / 'proxy-key.pem'))}",
              "identities:"]
    for identity in IDENTITIES.values():
        port = ports["mock"] if identity.reachable else ports["closed"]
        lines += [f"  {identity.name}:",
                  f"    authority: http://{HOST}:{port}",
                  f"    tenant: {TENANT}",
                  f"    client_id: {identity.client_id}",
                  f"    flow: {identity.flow}",
                  f"    min_token_lifetime: {identity.min_token_lifetime}",
                  f"    token_timeout: {identity.token_timeout}"]
        if not identity.delegated:
            lines.append(f"    client_secret: {yaml_str(identity.secret)}")
    lines.append("accounts:")
    for account in ACCOUNTS.values():
        lines.append(f"  - username: {account.username}")
        if account.hashed:
            lines.append(f"    password_hash: {yaml_str(hash_password(proxy_bin, account.password))}")
        else:
            lines.append(f"    password: {yaml_str(account.password)}")
        lines += [f"    mailbox: {account.mailbox}", f"    identity: {account.identity}"]
        if account.smtp_user:
            lines.append(f"    smtp_user: {account.smtp_user}")
    lines += [f"admin: {{ bind: \"{HOST}:{ports['admin']}\" }}",
              "token_store:", f"  path: {yaml_str(str(store))}",
              # token-single-flight makes 20 sessions for one mailbox at once.
              *(PENDING["per-protocol-caps"]["top"] if "per-protocol-caps" in pending
                else ["max_sessions_per_mailbox: 100"]),
              "log:", f"  level: {'debug' if debug else 'info'}", "  format: text", "shutdown_timeout: 2s", ""]
    return "\n".join(lines)


def check_config(ports: dict, ca_file: Path, name: str) -> str:
    """A config with one identity and one account and a listener per protocol, all
    in front of this run's Dovecot, for `check --online` (nothing binds them)."""
    identity_name, account_name, tenant, secret = CHECK_CONFIGS[name]
    identity, account = IDENTITIES[identity_name], ACCOUNTS[account_name]
    lines = [f"# `check --online` diagnoses this ({name}); written by e2e/world.py.", "listeners:"]
    for protocol, (upstream, tls) in PROTOCOLS.items():
        lines += [f"  - name: {protocol}", f"    protocol: {protocol}", f"    bind: {HOST}:0",
                  f"    upstream: {HOST}:{ports[upstream]}", f"    upstream_tls: {tls}", "    upstream_timeout: 10s"]
    lines += [f"upstream_ca_file: {yaml_str(str(ca_file))}", "identities:", f"  {identity.name}:",
              f"    authority: http://{HOST}:{ports['mock']}", f"    tenant: {tenant}",
              f"    client_id: {identity.client_id}", f"    client_secret: {yaml_str(secret or identity.secret)}",
              "accounts:", f"  - username: {account.username}", f"    password: {yaml_str(account.password)}",
              f"    mailbox: {account.mailbox}", f"    identity: {identity.name}"]
    if account.smtp_user:
        lines.append(f"    smtp_user: {account.smtp_user}")
    return "\n".join(lines + [""])


def prometheus_config(ports: dict) -> str:
    """One job: the proxy's admin listener, scraped every SCRAPE_INTERVAL."""
    return "\n".join([
        "# Prometheus for one e2e run, written by e2e/world.py; run.sh starts it.",
        "global:", f"  scrape_interval: {SCRAPE_INTERVAL}", f"  scrape_timeout: {SCRAPE_INTERVAL}",
        f"  evaluation_interval: {SCRAPE_INTERVAL}",
        "scrape_configs:", f"  - job_name: {PROMETHEUS_JOB}", "    static_configs:",
        f"      - targets: [\"{HOST}:{ports['admin']}\"]", ""])


def render(template: str, values: dict) -> str:
    return string.Template((HERE / "conf" / template).read_text()).substitute(values)


def write_private(path: Path, text: str) -> None:
    """A file only root reads (Postfix opens its password map before dropping privileges)."""
    path.write_text(text)
    path.chmod(0o600)


def postfix_nexthop(ports: dict, kind: str) -> str:
    return f"[{HOST}]:{ports[proxy_port_name(kind, 'smtp')]}"


def postfix_config(work: Path, ports: dict) -> None:
    """The site relay: main.cf and master.cf from conf/, and its tables as texthash files
    (read as they are, no postmap), in WORK/postfix/etc; every route logs in as the
    `relay` account. Its queue and data directories (made by run.sh) are siblings of
    etc, because Postfix wants everything below its config directory owned by root."""
    relay = ACCOUNTS["relay"]
    postfix_dir = work / "postfix" / "etc"
    values = {"postfix_dir": postfix_dir, "queue_dir": work / "postfix" / "queue",
              "data_dir": work / "postfix" / "data", "pki_dir": work / "pki", "postfix_port": ports["postfix"],
              "relayhost": postfix_nexthop(ports, "")}
    postfix_dir.mkdir(parents=True, exist_ok=True)
    for name in ["main.cf", "master.cf"]:
        (postfix_dir / name).write_text(render(f"postfix-{name}", values))
    nexthops = {postfix_nexthop(ports, kind) for _, kind, _ in POSTFIX_ROUTES.values()} | {values["relayhost"]}
    # sasl_passwd: "nexthop username:password"; the password is the rest of the line.
    write_private(postfix_dir / "sasl_passwd",
                  "".join(f"{hop} {relay.username}:{relay.password}\n" for hop in sorted(nexthops)))
    (postfix_dir / "sender_transport").write_text("".join(
        f"{sender} {transport}:{postfix_nexthop(ports, kind)}\n"
        for sender, (transport, kind, _) in POSTFIX_ROUTES.items()))
    (postfix_dir / "tls_policy").write_text("".join(
        f"{postfix_nexthop(ports, kind)} {policy}\n" for _, kind, policy in POSTFIX_ROUTES.values() if policy))


# mbsync scenario -> (account, listener kind, SSLType, AuthMechs)
MBSYNC = {
    "login": ("mbsync-login", "", "None", "LOGIN"),
    "plain": ("mbsync-plain", "", "None", "PLAIN"),
    "starttls": ("mbsync-starttls", "starttls", "STARTTLS", "*"),
    "imaps": ("mbsync-imaps", "implicit", "IMAPS", "*"),
}


def mbsync_config(work: Path, ports: dict) -> None:
    """One mbsync configuration (-c FILE) per MBSYNC entry: INBOX of the account, pulled
    through the proxy into a Maildir of its own. The password comes from a file through
    PassCmd, so no quoting rule of the config file touches it."""
    directory = work / "mbsync"
    directory.mkdir(exist_ok=True)
    for name, (username, kind, ssl_type, mechanisms) in MBSYNC.items():
        password_file = directory / f"{name}.password"
        write_private(password_file, ACCOUNTS[username].password + "\n")
        maildir, state = directory / name / "maildir", directory / name / "state"
        # mbsync makes the INBOX Maildir, but neither the store's Path nor SyncState's.
        for path in (maildir, state):
            path.mkdir(parents=True, exist_ok=True)
        tls = [] if ssl_type == "None" else [
            # mbsync 1.4 checks only DNS names, never an IP address, against its Host: the
            # proxy's certificate itself is trusted instead (what `mbsync-get-cert` gives).
            "SystemCertificates no", f"CertificateFile {work / 'pki' / 'proxy.pem'}"]
        (directory / f"{name}.rc").write_text("\n".join([
            f"# mbsync for the mbsync-{name} scenario, written by e2e/world.py.",
            f"IMAPAccount {name}", f"Host {HOST}", f"Port {ports[proxy_port_name(kind, 'imap')]}",
            f"User {username}", f"PassCmd \"cat {password_file}\"", f"SSLType {ssl_type}", *tls,
            f"AuthMechs {mechanisms}", "Timeout 20", "",
            f"IMAPStore {name}-far", f"Account {name}", "",
            f"MaildirStore {name}-near", f"Path {maildir}/", f"Inbox {maildir}/INBOX", "",
            f"Channel {name}", f"Far :{name}-far:", f"Near :{name}-near:",
            "Sync Pull", "Create Near", "Expunge None", f"SyncState {state}/", ""]))


def configure(work: Path, proxy_bin: str, debug: bool) -> None:
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    dovecot_dir, logs = work / "dovecot", work / "logs"
    dovecot_secret = secrets.token_urlsafe(24)
    values = {
        "instance": f"xoauth2-e2e-{work.name}",
        "dovecot_dir": dovecot_dir, "pki_dir": work / "pki", "mail_dir": work / "mail",
        "log_file": logs / "dovecot.log", "debug": "yes" if debug else "no",
        "mail_user": "nobody", "mail_group": "nogroup",
        "dovecot_client_id": DOVECOT_CLIENT_ID, "dovecot_client_secret": dovecot_secret,
        **{f"{name}_port": port for name, port in ports.items()},
    }
    dovecot_dir.mkdir(exist_ok=True)
    for template in ["dovecot.conf", "oauth2-introspect.conf.ext", "oauth2-grant.conf.ext"]:
        (dovecot_dir / template).write_text(render(template, values))
    (work / "mock.json").write_text(json.dumps(mock_config(dovecot_secret), indent=2))
    pending = pending_enabled()
    (work / "proxy.yaml").write_text(proxy_config(ports, work / "pki", work / "store", proxy_bin, debug, pending))
    postfix_config(work, ports)
    mbsync_config(work, ports)
    (work / "prometheus").mkdir(exist_ok=True)
    (work / "prometheus" / "prometheus.yml").write_text(prometheus_config(ports))
    check_configs = {}
    for name in CHECK_CONFIGS:
        check_configs[name] = str(work / f"check-{name}.yaml")
        Path(check_configs[name]).write_text(check_config(ports, work / "pki" / "ca.pem", name))
    env = {
        "work": str(work), "host": HOST, "ports": ports,
        "proxy_bin": proxy_bin, "proxy_config": str(work / "proxy.yaml"), "token_store": str(work / "store"),
        "ca_file": str(work / "pki" / "ca.pem"),
        "check_configs": check_configs,
        "sink_dir": str(work / "sink"),
        "dovecot_config": str(dovecot_dir / "dovecot.conf"),
        "pending": pending, "postfix_config": str(work / "postfix" / "etc"), "mbsync_dir": str(work / "mbsync"),
        "prometheus": os.environ.get("E2E_PROMETHEUS", "1") != "0", "prometheus_job": PROMETHEUS_JOB,
        "logs": {name: str(logs / f"{name}.log")
                 for name in ["proxy", "dovecot", "mock", "sink", "postfix", "prometheus"]},
    }
    (work / "env.json").write_text(json.dumps(env, indent=2))
    (work / "ports.env").write_text("".join(f"PORT_{name.upper()}={port}\n" for name, port in ports.items()))


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "configure":
        sys.exit(f"usage: {sys.argv[0]} configure WORK_DIR PROXY_BIN")
    configure(Path(sys.argv[2]), sys.argv[3], debug=bool(os.environ.get("E2E_DEBUG")))


if __name__ == "__main__":
    main()
