#!/usr/bin/env python3
"""The e2e suite's test world, defined once: tenant, app registrations, accounts.

The mock Entra's clients, the proxy's identities and accounts, and the logins the
scenarios make are all derived from the tables below, so they cannot drift apart.

    python3 e2e/world.py configure WORK_DIR PROXY_BIN

picks free loopback ports and writes, under WORK_DIR, everything one run needs:
mock.json, proxy.yaml, dovecot/{dovecot.conf,oauth2-*.conf.ext}, env.json (what the
scenarios read) and ports.env (what e2e/run.sh sources).
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

    @property
    def password(self) -> str:
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
    Identity("faulty", token_timeout="2s"),
    Identity("unreachable", reachable=False, token_timeout="2s"),
    Identity("denied", permitted=False),
    Identity("throttled"),
    # Like ticker, for token-endpoint-down-valid-token (opt-in: it shows a proxy bug).
    Identity("margin", lifetime=60, min_token_lifetime="10s"),
    Identity("burst"),
    Identity("never"),
    # Delegated: 30 s tokens, so the scenario sees refresh tokens rotate a few times.
    Identity("delegated", lifetime=30, min_token_lifetime="5s", flow="refresh_token"),
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
    Account("stranded", "unreachable"),
    Account("denied", "denied"),
    Account("throttled", "throttled"),
    Account("margin", "margin"),
    Account("burst", "burst"),
    Account("never", "never"),
    Account("delegate", "delegated"),
]}

PROTOCOLS = {"imap": ("imaps", "implicit"), "pop3": ("pop3s", "implicit"), "smtp": ("submission", "starttls")}


def proxy_port_name(kind: str, protocol: str) -> str:
    return f"proxy_{kind}_{protocol}" if kind else f"proxy_{protocol}"


# Three listeners per protocol, all in front of the same Dovecot: the ones most scenarios
# use; "cold" ones that get no session before Dovecot is stopped (upstream-down); and
# "badtls" ones that reach Dovecot as "localhost", a name its certificate does not carry.
LISTENER_KINDS = {"": HOST, "cold": HOST, "badtls": "localhost"}
PORT_NAMES = ["mock", "sink", "imaps", "pop3s", "submission", "closed",
              *[proxy_port_name(kind, protocol) for kind in LISTENER_KINDS for protocol in PROTOCOLS]]


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
    clients[DELEGATED_CLIENT_ID] = {"public": True, "lifetime": IDENTITIES["delegated"].lifetime,
                                    "device_interval": 1}
    return {"tenant": TENANT, "domain": DOMAIN, "clients": clients,
            "dovecot_client": {"id": DOVECOT_CLIENT_ID, "secret": dovecot_secret}}


def proxy_config(ports: dict, ca_file: Path, store: Path, proxy_bin: str, debug: bool) -> str:
    lines = ["# xoauth2-proxy configuration for one e2e run, written by e2e/world.py.", "listeners:"]
    for kind, upstream_host in LISTENER_KINDS.items():
        for protocol, (upstream, tls) in PROTOCOLS.items():
            lines += [f"  - name: e2e-{kind + '-' if kind else ''}{protocol}",
                      f"    protocol: {protocol}",
                      f"    bind: {HOST}:{ports[proxy_port_name(kind, protocol)]}",
                      f"    upstream: {upstream_host}:{ports[upstream]}",
                      f"    upstream_tls: {tls}",
                      "    upstream_timeout: 10s"]
    lines += [f"upstream_ca_file: {yaml_str(str(ca_file))}", "identities:"]
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
    lines += ["token_store:", f"  path: {yaml_str(str(store))}",
              # token-single-flight makes 20 sessions for one mailbox at once.
              "max_sessions_per_mailbox: 100",
              "log:", f"  level: {'debug' if debug else 'info'}", "  format: text", "shutdown_timeout: 2s", ""]
    return "\n".join(lines)


def render(template: str, values: dict) -> str:
    return string.Template((HERE / "conf" / template).read_text()).substitute(values)


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
    (work / "proxy.yaml").write_text(proxy_config(ports, work / "pki" / "ca.pem", work / "store", proxy_bin, debug))
    env = {
        "work": str(work), "host": HOST, "ports": ports,
        "proxy_bin": proxy_bin, "proxy_config": str(work / "proxy.yaml"), "token_store": str(work / "store"),
        "ca_file": str(work / "pki" / "ca.pem"),
        "sink_dir": str(work / "sink"),
        "dovecot_config": str(dovecot_dir / "dovecot.conf"),
        "logs": {name: str(logs / f"{name}.log") for name in ["proxy", "dovecot", "mock", "sink"]},
    }
    (work / "env.json").write_text(json.dumps(env, indent=2))
    (work / "ports.env").write_text("".join(f"PORT_{name.upper()}={port}\n" for name, port in ports.items()))


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "configure":
        sys.exit(f"usage: {sys.argv[0]} configure WORK_DIR PROXY_BIN")
    configure(Path(sys.argv[2]), sys.argv[3], debug=bool(os.environ.get("E2E_DEBUG")))


if __name__ == "__main__":
    main()
