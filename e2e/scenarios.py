#!/usr/bin/env python3
"""The e2e scenarios and their runner.

    python3 e2e/scenarios.py --env WORK/env.json [GLOB ...]

e2e/run.sh starts everything and then runs this. Each scenario prints one line,
`PASS name (detail)` or `FAIL name: reason` followed by what the logs said meanwhile,
and the run ends with `N passed, M failed`. Phases: "background" scenarios (the long
token-lifetime one) run in a thread alongside the "main" ones; "final" ones run last,
because they stop Dovecot.
"""

import argparse
import base64
import fnmatch
import functools
import imaplib
import itertools
import poplib
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import world
from harness import (ANSWERS, TIMEOUT, Attempt, Clients, Env, Failed, Logs, Mock, Sink, check, curl_auth_command,
                     imap_append, message, new_id, sha256, wait_until, without_received)
from world import ACCOUNTS as A, IDENTITIES

PROTOCOLS = ["imap", "pop3", "smtp"]
RCPT = "rcpt@example.net"


@dataclass
class Context:
    env: Env
    mock: Mock
    sink: Sink
    clients: Clients
    attempt: Attempt
    logs: Logs

    def stop_dovecot(self) -> None:
        """Stops this run's Dovecot with its own command (idempotent), and waits until
        its IMAPS port refuses connections. Each warm listener is greeted first, so it
        has learned Dovecot's capabilities whatever scenarios ran before."""
        def down() -> bool:
            try:
                socket.create_connection((self.env.host, self.env.ports["imaps"]), timeout=1).close()
                return False
            except OSError:
                return True

        if down():
            return
        for protocol in PROTOCOLS:
            with socket.create_connection((self.env.host, self.env.proxy_port(protocol)), timeout=TIMEOUT) as s:
                check(s.recv(4096), f"the {protocol} listener sent no greeting")
        subprocess.run(["dovecot", "-c", self.env.dovecot_config, "stop"], check=True, timeout=30)
        wait_until(down, 20, "Dovecot to stop")


@dataclass
class Scenario:
    name: str
    run: Callable[[Context], str | None]
    phase: str  # background | main | final
    default: bool = True  # False: runs only when named (a known proxy bug it reproduces)


SCENARIOS: list[Scenario] = []


def scenario(name: str, phase: str = "main", default: bool = True, **bound):
    """Registers a scenario, in source order; `bound` keyword arguments are passed to it,
    so one function can back a family (see `variants`)."""
    def register(fn):
        SCENARIOS.append(Scenario(name, functools.partial(fn, **bound) if bound else fn, phase, default))
        return fn
    return register


def variants(fn, *names_and_arguments: tuple[str, dict], phase: str = "main") -> None:
    """Registers one scenario per (name, keyword arguments)."""
    for name, bound in names_and_arguments:
        scenario(name, phase, **bound)(fn)


def per_protocol(fn, prefix: str, phase: str = "main", **bound) -> None:
    """Registers `prefix-imap`, `prefix-pop3` and `prefix-smtp`."""
    variants(fn, *[(f"{prefix}-{p}", {"protocol": p, **bound}) for p in PROTOCOLS], phase=phase)


# curl's --login-options: AUTH=PLAIN, AUTH=LOGIN, and none (curl picks from the capabilities).
CURL_MECHANISMS = [("auth-plain", "PLAIN"), ("auth-login", "LOGIN"), ("default", None)]


def curl_variants(fn, protocol: str) -> None:
    """Registers `{protocol}-curl-auth-plain`, `-auth-login` and `-default`."""
    variants(fn, *[(f"{protocol}-curl-{suffix}", {"mechanism": m}) for suffix, m in CURL_MECHANISMS])


def curl_used(transcript: str, protocol: str, mechanism: str | None) -> str:
    """Checks curl authenticated with `mechanism` (any, if None); describes what it used."""
    used = curl_auth_command(transcript)
    verb = "AUTHENTICATE" if protocol == "imap" else "AUTH"
    check(mechanism is None or used == f"{verb} {mechanism}", f"curl sent {used}")
    return f"curl used {used}"


def same_bytes(got: bytes, want: bytes, what: str) -> None:
    check(got == want, f"{what}: got {len(got)} bytes (sha256 {sha256(got)[:12]}), "
                       f"sent {len(want)} bytes (sha256 {sha256(want)[:12]})")


def refused(action: Callable, errors, what: str) -> None:
    try:
        action()
    except errors:
        return
    raise Failed(f"{what} was accepted")


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def delivered(ctx: Context, sent: dict[str, bytes], timeout: float = 60) -> None:
    """Every message in `sent` (by X-E2E-Id) reached the sink byte for byte, relayed by a
    Dovecot session that was authenticated and over TLS (ESMTPSA in its Received:)."""
    entries = ctx.sink.wait_for(list(sent), timeout)
    for e2e_id, data in sent.items():
        stored = ctx.sink.body(entries[e2e_id])
        body = without_received(stored)
        same_bytes(body, data, f"message {e2e_id} at the sink")
        received = stored[: len(stored) - len(body)]
        check(b"with ESMTPSA" in received, f"Dovecot's Received: does not say ESMTPSA: {received[:200]!r}")


def grants_for(ctx: Context, identity: str, mailbox: str) -> int:
    client = IDENTITIES[identity].client_id
    return ctx.mock.stats()["grants"].get(client, {}).get("mailboxes", {}).get(mailbox, 0)


# ---- Dovecot is a real XOAUTH2-only upstream that insists on TLS -------------------

@scenario("dovecot-refuses-plain-logins")
def dovecot_refuses_plain_logins(ctx: Context):
    """Straight to Dovecot, over TLS: IMAP LOGIN, POP3 USER/PASS and SMTP AUTH PLAIN all
    fail, so each proxied plain login that succeeds was turned into XOAUTH2 by the proxy."""
    env, alice = ctx.env, A["alice"]
    imap = imaplib.IMAP4_SSL(env.host, env.ports["imaps"], ssl_context=env.tls(), timeout=TIMEOUT)
    check("AUTH=XOAUTH2" in imap.capabilities and "AUTH=PLAIN" not in imap.capabilities,
          f"Dovecot's IMAP capabilities: {imap.capabilities}")
    refused(lambda: imap.login(alice.mailbox, alice.password), imaplib.IMAP4.error, "IMAP LOGIN at Dovecot")
    imap.logout()
    pop = poplib.POP3_SSL(env.host, env.ports["pop3s"], context=env.tls(), timeout=TIMEOUT)
    refused(lambda: (pop.user(alice.mailbox), pop.pass_(alice.password)), poplib.error_proto,
            "POP3 USER/PASS at Dovecot")
    pop.close()
    smtp = smtplib.SMTP(env.host, env.ports["submission"], timeout=TIMEOUT)
    smtp.starttls(context=env.tls())
    smtp.ehlo()
    mechanisms = smtp.esmtp_features.get("auth", "").split()
    check("PLAIN" not in mechanisms and "XOAUTH2" in mechanisms, f"Dovecot's SMTP AUTH: {mechanisms}")
    plain = base64.b64encode(f"\0{alice.mailbox}\0{alice.password}".encode()).decode()
    code, reply = smtp.docmd("AUTH", f"PLAIN {plain}")
    check(code >= 500, f"SMTP AUTH PLAIN at Dovecot answered {code} {reply!r}")
    smtp.close()


@scenario("dovecot-refuses-xoauth2-without-tls")
def dovecot_refuses_cleartext(ctx: Context):
    """A valid token over submission without STARTTLS is refused (by the auth policy:
    Dovecot itself counts loopback as secure), the same token after STARTTLS is
    accepted; so every proxied SMTP login that succeeds went over STARTTLS."""
    token, mailbox = ctx.mock.app_token("main"), A["alice"].mailbox
    refusals = ctx.mock.stats()["policy"]["refused"]
    for tls, expected in [(False, 535), (True, 235)]:
        smtp = smtplib.SMTP(ctx.env.host, ctx.env.ports["submission"], timeout=TIMEOUT)
        smtp.ehlo()
        if tls:
            smtp.starttls(context=ctx.env.tls())
            smtp.ehlo()
        code, reply = smtp.docmd("AUTH", "XOAUTH2")
        if code == 334:
            code, reply = smtp.docmd(xoauth2(mailbox, token))
        if code == 334:  # the XOAUTH2 error challenge wants an empty line
            code, reply = smtp.docmd("")
        smtp.close()
        check(code == expected, f"XOAUTH2 {'with' if tls else 'without'} STARTTLS: {code} {reply!r}")
    check(ctx.mock.stats()["policy"]["refused"] == refusals + 1, "the policy server did not refuse once")


# ---- IMAP --------------------------------------------------------------------------

def select_and_fetch(client: imaplib.IMAP4, uid: int, data: bytes) -> int:
    """SELECTs INBOX, FETCHes message `uid` and compares it with `data` byte for byte;
    returns how many messages INBOX holds."""
    typ, count = client.select("INBOX")
    check(typ == "OK", f"SELECT: {typ} {count}")
    typ, fetched = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
    check(typ == "OK" and isinstance(fetched[0], tuple), f"FETCH: {typ} {fetched[:1]!r:.200}")
    same_bytes(fetched[0][1], data, "FETCH BODY[]")
    return int(count[0])


@scenario("imap-login-imaplib")
def imap_login(ctx: Context):
    """LOGIN, LIST, APPEND, SELECT, then FETCH the message back byte for byte."""
    data = message(new_id(), eightbit=True)
    client = ctx.clients.imap_login(A["alice"])
    typ, listing = client.list()
    check(typ == "OK" and any(b"INBOX" in line for line in listing), f"LIST: {typ} {listing}")
    count = select_and_fetch(client, imap_append(client, data), data)
    client.logout()
    return f"{len(data)} bytes, {count} messages in INBOX"


@scenario("imap-10mib-append-fetch")
def imap_large(ctx: Context):
    """A 10 MiB message APPENDed and FETCHed back byte for byte: volume both ways."""
    data = message(new_id(), size=10 * 1024 * 1024)
    started = time.monotonic()
    client = ctx.clients.imap_login(A["alice"])
    select_and_fetch(client, imap_append(client, data), data)
    client.logout()
    return f"{len(data)} bytes up and down in {time.monotonic() - started:.1f}s"


@scenario("imap-authenticate-plain-imaplib")
def imap_authenticate_plain(ctx: Context):
    """AUTHENTICATE PLAIN (continuation form), SELECT, FETCH byte for byte."""
    alice, data = A["alice"], message(new_id())
    uid = ctx.clients.append(alice, data)
    client = ctx.clients.imap()
    check("AUTH=PLAIN" in client.capabilities, f"proxy's IMAP capabilities: {client.capabilities}")
    typ, _ = client.authenticate("PLAIN", lambda _: f"\0{alice.username}\0{alice.password}".encode())
    check(typ == "OK", f"AUTHENTICATE PLAIN: {typ}")
    select_and_fetch(client, uid, data)
    client.logout()


@scenario("imap-idle-imaplib")
def imap_idle(ctx: Context):
    """An IDLE session through the proxy hears "* n EXISTS" when another session
    APPENDs a message."""
    alice = A["alice"]
    watcher = ctx.clients.imap_login(alice)
    typ, count = watcher.select("INBOX")
    before = int(count[0])
    tag = watcher._new_tag()  # imaplib 3.11 has no idle(): speak RFC 2177 directly
    watcher.send(tag + b" IDLE\r\n")
    check(watcher.readline().startswith(b"+"), "IDLE got no continuation")
    appended = time.monotonic()
    ctx.clients.append(alice, message(new_id()))
    line = b""
    while not line.endswith(b"EXISTS\r\n"):
        line = watcher.readline()  # the socket timeout bounds the wait
        check(line, "the connection closed during IDLE")
    woke = time.monotonic() - appended
    check(int(line.split()[1]) == before + 1, f"IDLE said {line!r}, expected {before + 1} EXISTS")
    watcher.send(b"DONE\r\n")
    while not line.startswith(tag):
        line = watcher.readline()
    check(line.split()[1] == b"OK", f"IDLE ended with {line!r}")
    watcher.logout()
    return f"woke {woke:.2f}s after the APPEND"


def imap_curl(ctx: Context, mechanism: str | None):
    """curl logs in (SASL-IR where it applies) and FETCHes a message byte for byte."""
    alice, data = A["alice"], message(new_id())
    uid = ctx.clients.append(alice, data)
    out, transcript = ctx.clients.curl("imap", alice, f"INBOX;UID={uid}", mechanism=mechanism)
    same_bytes(out, data, "curl's FETCH")
    return curl_used(transcript, "imap", mechanism)


curl_variants(imap_curl, "imap")


# ---- POP3 --------------------------------------------------------------------------

def pop3_session(ctx: Context, username: str, password: str, mechanism: str) -> poplib.POP3:
    client = ctx.clients.pop3()
    if mechanism == "USER":
        client.user(username)
        client.pass_(password)
    else:  # poplib has no AUTH command: send the RFC 5034 initial-response form
        plain = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        client._shortcmd(f"AUTH PLAIN {plain}")
    return client


def pop3_maildrop(ctx: Context, account: str, mechanism: str):
    """STAT, LIST, RETR byte for byte, DELE, QUIT; a new session sees the deletion."""
    acct = A[account]
    ctx.clients.pop3_empty(acct)
    sent = [message(new_id()), message(new_id(), eightbit=True)]
    for data in sent:
        ctx.clients.append(acct, data)
    client = pop3_session(ctx, acct.username, acct.password, mechanism)
    count, size = client.stat()
    check((count, size) == (2, sum(map(len, sent))), f"STAT: {count} {size}")
    _, listing, _ = client.list()
    check([int(line.split()[1]) for line in listing] == [len(m) for m in sent], f"LIST: {listing}")
    for number, data in enumerate(sent, 1):
        _, lines, _ = client.retr(number)
        same_bytes(b"\r\n".join(lines) + b"\r\n", data, f"RETR {number}")
    client.dele(1)
    check(client.quit().startswith(b"+OK"), "QUIT")
    client = pop3_session(ctx, acct.username, acct.password, mechanism)
    check(client.stat()[0] == 1, "DELE 1 did not stick after QUIT")
    _, lines, _ = client.retr(1)
    same_bytes(b"\r\n".join(lines) + b"\r\n", sent[1], "RETR 1 after the deletion")
    client.quit()


variants(pop3_maildrop, ("pop3-user-pass-poplib", {"account": "popper", "mechanism": "USER"}),
         ("pop3-auth-plain-poplib", {"account": "popauth", "mechanism": "PLAIN"}))


def pop3_curl(ctx: Context, mechanism: str | None):
    """curl logs in and RETRs the only message byte for byte."""
    acct, data = A["popcurl"], message(new_id())
    ctx.clients.pop3_empty(acct)
    ctx.clients.append(acct, data)
    out, transcript = ctx.clients.curl("pop3", acct, "1", mechanism=mechanism)
    same_bytes(out, data, "curl's RETR")
    return curl_used(transcript, "pop3", mechanism)


curl_variants(pop3_curl, "pop3")


# ---- SMTP --------------------------------------------------------------------------

def smtp_send(ctx: Context, messages: dict[str, bytes], mechanism: str = "PLAIN",
              initial_response: bool = True) -> None:
    """One session through the proxy as the shared-mailbox account: AUTH, then each message."""
    acct = A["sales"]
    client = ctx.clients.smtp()
    client.ehlo()
    check(mechanism in client.esmtp_features.get("auth", "").split(),
          f"proxy's SMTP AUTH: {client.esmtp_features.get('auth')}")
    client.user, client.password = acct.username, acct.password
    authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    code, reply = client.auth(mechanism, authobject, initial_response_ok=initial_response)
    check(code == 235, f"AUTH {mechanism}: {code} {reply!r}")
    for data in messages.values():
        check(client.sendmail(acct.smtp_user, [RCPT], data) == {}, "a recipient was refused")
    client.quit()


def smtp_auth(ctx: Context, mechanism: str, initial_response: bool):
    """smtplib logs in and sends; the sink gets the message byte for byte, and the
    upstream login used the account's smtp_user (the delegate), not its mailbox."""
    acct = A["sales"]
    grants = grants_for(ctx, acct.identity, acct.smtp_user)
    sent = {i: message(i, eightbit=True, sender=acct.smtp_user) for i in [new_id()]}
    smtp_send(ctx, sent, mechanism, initial_response)
    delivered(ctx, sent)
    check(grants_for(ctx, acct.identity, acct.smtp_user) == grants + 1,
          f"Dovecot did not see one XOAUTH2 login as {acct.smtp_user}")


variants(smtp_auth, ("smtp-auth-plain-smtplib", {"mechanism": "PLAIN", "initial_response": True}),
         ("smtp-auth-login-smtplib", {"mechanism": "LOGIN", "initial_response": False}))


def smtp_curl(ctx: Context, mechanism: str | None):
    """curl logs in and uploads a message; the sink gets it byte for byte."""
    acct, e2e_id = A["sales"], new_id()
    data = message(e2e_id, sender=acct.smtp_user)
    upload = ctx.env.work / f"curl-{e2e_id}.eml"
    upload.write_bytes(data)
    _, transcript = ctx.clients.curl("smtp", acct, "", "--mail-from", acct.smtp_user, "--mail-rcpt", RCPT,
                                     "--upload-file", str(upload), mechanism=mechanism)
    delivered(ctx, {e2e_id: data})
    return curl_used(transcript, "smtp", mechanism)


curl_variants(smtp_curl, "smtp")


@scenario("smtp-10mib-message")
def smtp_large(ctx: Context):
    """A 10 MiB message arrives byte for byte."""
    e2e_id = new_id()
    sent = {e2e_id: message(e2e_id, size=10 * 1024 * 1024)}
    started = time.monotonic()
    smtp_send(ctx, sent)
    delivered(ctx, sent)
    return f"{len(sent[e2e_id])} bytes in {time.monotonic() - started:.1f}s"


@scenario("smtp-100-messages-concurrent", sessions=10, per_session=10)
def smtp_concurrent(ctx: Context, sessions: int, per_session: int):
    """100 small messages over 10 concurrent sessions all arrive byte for byte."""
    batches = [{i: message(i, eightbit=n % 2 == 0) for i in (new_id() for _ in range(per_session))}
               for n in range(sessions)]
    started = time.monotonic()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(lambda batch: smtp_send(ctx, batch), batches))
    delivered(ctx, {k: v for batch in batches for k, v in batch.items()})
    return f"{sessions * per_session} messages in {time.monotonic() - started:.1f}s"


# ---- tokens ------------------------------------------------------------------------

@scenario("token-lifetime-60s", phase="background", logins=25, every=5.0)
def token_lifetime(ctx: Context, logins: int, every: float):
    """60-second tokens, min_token_lifetime 10s: a login every 5 s for 2 minutes, over
    the three protocols, always succeeds; the proxy replaces its token in the background
    13 s before expiry (min_token_lifetime plus a lead of 1/20 of the lifetime), so about
    one token request per lifetime, and no expired token ever reaches Dovecot."""
    acct, identity = A["ticker"], "ticker"
    protocols = itertools.cycle(PROTOCOLS)
    started = time.monotonic()
    for n in range(logins):
        time.sleep(max(0.0, started + n * every - time.monotonic()))
        ctx.attempt.expect(next(protocols), "ok", acct.username, acct.password)
    times = ctx.mock.stats()["token_times"].get(IDENTITIES[identity].client_id, [])
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    span = logins * every - every
    expected = int(span // 47) + 1
    check(len(times) in (expected, expected + 1), f"{len(times)} token requests in {span:.0f}s of logins "
                                                  f"(gaps {gaps}), expected {expected}: one per ~47 s")
    check(all(45 <= gap <= 50 for gap in gaps), f"token request gaps {gaps}s, expected about 47 s")
    stale = ctx.mock.counter("introspections", identity, "inactive")
    check(stale == 0, f"Dovecot was shown {stale} expired token(s)")
    return f"{logins} logins, {len(times)} token requests, gaps {gaps} s"


@scenario("token-single-flight", logins=20)
def token_single_flight(ctx: Context, logins: int):
    """20 simultaneous logins with no cached token share one token request."""
    acct, gate = A["burst"], threading.Barrier(logins)

    def login(_):
        gate.wait(TIMEOUT)
        return ctx.attempt.run("imap", acct.username, acct.password)[1]

    with ThreadPoolExecutor(logins) as pool:
        answers = list(pool.map(login, range(logins)))
    check(answers == ["OK"] * logins, f"answers: {sorted(set(answers))}")
    requests = ctx.mock.token_requests("burst")
    check(requests == 1, f"{logins} concurrent logins made {requests} token requests")


def token_revoked(ctx: Context, protocol: str):
    """A token revoked at the mock is refused by Dovecot; the proxy drops it, fetches one
    fresh token and logs in on a new upstream connection, and the client never notices."""
    acct, identity = A["revokee"], "revoke"
    ctx.attempt.expect(protocol, "ok", acct.username, acct.password)  # a token is cached now
    requests, stale = ctx.mock.token_requests(identity), ctx.mock.counter("introspections", identity, "inactive")
    marks = ctx.logs.marks()
    check(ctx.mock.revoke(identity) >= 1, "the mock had no active token to revoke")
    ctx.attempt.expect(protocol, "ok", acct.username, acct.password)
    check(ctx.mock.counter("introspections", identity, "inactive") == stale + 1,
          "Dovecot was not shown the revoked token exactly once")
    check(ctx.mock.token_requests(identity) == requests + 1, "not exactly one fresh token request")
    check(any('user="revokee"' in line and "retrying once with a fresh token" in line
              for line in ctx.logs.since(marks, "proxy").splitlines()), "the proxy did not log the retry")


per_protocol(token_revoked, "token-revoked-replaced")


def token_refused(ctx: Context, protocol: str):
    """The app has no permission on the mailbox: Dovecot refuses every token; the proxy
    tries once more with a fresh token, then answers with the auth-failure reply."""
    acct, identity = A["denied"], "denied"
    denied, requests = ctx.mock.counter("grants", identity, "denied"), ctx.mock.token_requests(identity)
    answer = ctx.attempt.expect(protocol, "auth-failed", acct.username, acct.password)
    check(ctx.mock.counter("grants", identity, "denied") == denied + 2,
          "Dovecot did not see exactly two attempts (the first and one retry)")
    # The retry must use a freshly requested token; a login that found no token cached
    # also requested the first one.
    fresh = ctx.mock.token_requests(identity) - requests
    check(1 <= fresh <= 2, f"{fresh} token requests for one login")
    return answer


per_protocol(token_refused, "token-refused-after-retry")


def upstream_tls_fails(ctx: Context, protocol: str):
    """Dovecot's certificate does not name "localhost": a listener that reaches it by
    that name cannot verify it, and clients get the unavailable answer."""
    marks = ctx.logs.marks()
    answer = unavailable(ctx, protocol, "badtls", "greeting")
    check(re.search(r"certificate|NotValidForName", ctx.logs.since(marks, "proxy"), re.IGNORECASE),
          "the proxy did not log a certificate error")
    return answer


per_protocol(upstream_tls_fails, "upstream-tls-fails")


def upstream_temporary(ctx: Context, protocol: str):
    """Dovecot answers a temporary failure (its token check is down, as when Exchange
    throttles): the client gets the temporary-failure answer, and the proxy neither
    drops the token nor retries."""
    acct, identity = A["throttled"], "throttled"
    ctx.attempt.expect(protocol, "ok", acct.username, acct.password)  # a token is cached now
    failed, requests = ctx.mock.counter("introspections", identity, "failed"), ctx.mock.token_requests(identity)
    ctx.mock.fault(identity, "introspection_500")
    try:
        answer = ctx.attempt.expect(protocol, "temporary", acct.username, acct.password)
    finally:
        ctx.mock.fault(identity, "none")
    check(ctx.mock.counter("introspections", identity, "failed") == failed + 1,
          "Dovecot did not see exactly one attempt")
    check(ctx.mock.token_requests(identity) == requests, "the proxy requested a token for a temporary failure")
    return answer


per_protocol(upstream_temporary, "upstream-temporary-failure")


def token_failure(ctx: Context, protocol: str, identity: str, kind: str, fault: str | None = None) -> str:
    """Logs in while the token endpoint misbehaves: the answer is the `kind` row, it comes
    within token_timeout (plus slack), and the proxy asked the endpoint once."""
    acct = next(a for a in A.values() if a.identity == identity)
    requests = ctx.mock.token_requests(identity)
    if fault:
        ctx.mock.fault(identity, fault, delay=4)
    try:
        started = time.monotonic()
        answer = ctx.attempt.expect(protocol, kind, acct.username, acct.password)
        elapsed = time.monotonic() - started
    finally:
        if fault:
            ctx.mock.fault(identity, "none")
    timeout = float(IDENTITIES[identity].token_timeout.rstrip("s"))
    check(elapsed < timeout + 3, f"the answer took {elapsed:.1f}s (token_timeout {timeout:.0f}s)")
    if IDENTITIES[identity].reachable:
        check(ctx.mock.token_requests(identity) == requests + 1, "not exactly one token request")
    return f"{answer.strip()} after {elapsed:.1f}s"


# The faulty identity never obtains a token before token-endpoint-recovers, so every
# one of these logins has no valid token to fall back on.
per_protocol(token_failure, "token-endpoint-500", identity="faulty", kind="temporary", fault="500")
per_protocol(token_failure, "token-endpoint-slow", identity="faulty", kind="temporary", fault="slow")
per_protocol(token_failure, "token-endpoint-unreachable", identity="unreachable", kind="temporary")
# invalid_grant means a human must act (DESIGN.md): not a temporary failure.
per_protocol(token_failure, "token-endpoint-invalid-grant", identity="faulty", kind="auth-failed",
             fault="invalid_grant")


@scenario("token-endpoint-recovers")
def token_endpoint_recovers(ctx: Context):
    """Once the token endpoint answers again, the same account logs in everywhere."""
    acct = A["faulty"]
    for protocol in PROTOCOLS:
        ctx.attempt.expect(protocol, "ok", acct.username, acct.password)


@scenario("token-endpoint-down-valid-token", phase="background")
def token_down_valid_token(ctx: Context):
    """DESIGN.md: keep using a valid cached token while the token endpoint is down. The
    endpoint fails from 20 s into a 60 s token's life, so the background refresh (due at
    47 s) fails and is retried; at 52 s, with 8 s left (inside min_token_lifetime, but
    valid), a login still goes through on the cached token."""
    acct, identity = A["margin"], "margin"
    ctx.attempt.expect("imap", "ok", acct.username, acct.password)
    issued = ctx.mock.stats()["token_times"][IDENTITIES[identity].client_id][-1]
    time.sleep(max(0.0, issued + 20 - time.time()))
    ctx.mock.fault(identity, "500")
    try:
        time.sleep(max(0.0, issued + 52 - time.time()))
        answer = ctx.attempt.expect("imap", "ok", acct.username, acct.password)
        failed = ctx.mock.token_requests(identity) - 1
        check(failed >= 1, "the background refresh never tried the failing endpoint")
    finally:
        ctx.mock.fault(identity, "none")
    return f"{answer} with 8 s left; {failed} failed refresh attempt(s) meanwhile"


@scenario("delegated-device-login-refresh", phase="background", logins=9, every=8.0)
def delegated_login(ctx: Context, logins: int, every: float):
    """A delegated identity (public client, refresh_token flow): `xoauth2-proxy login`
    signs the account in with the device code flow (approved at the mock as the user)
    and stores the refresh token; then logins through the proxy work on all three
    protocols across several 30 s token lifetimes, while the refresh token rotates at
    every refresh (the mock accepts each one once); and `xoauth2-proxy token` prints a
    token Dovecot accepts directly, as imapsync uses it."""
    env, acct = ctx.env, A["delegate"]
    login = subprocess.Popen(env.proxy_command("login", acct.username), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        user_code = None
        for line in login.stdout:
            found = re.search(r"enter the code (\S+)", line)
            if found:
                user_code = found.group(1)
                break
        check(user_code is not None, "`login` printed no user code")
        ctx.mock.device(user_code, "approve", user=acct.mailbox)
        out, err = login.communicate(timeout=TIMEOUT)
    finally:
        if login.poll() is None:
            login.kill()
    check(login.returncode == 0, f"`login` exited {login.returncode}: {err.strip()}")
    stored = list(env.token_store.glob("*.token"))
    check(len(stored) == 1 and stored[0].stat().st_mode & 0o777 == 0o600, f"token store: {stored}")

    protocols = itertools.cycle(PROTOCOLS)
    started = time.monotonic()
    for n in range(logins):
        time.sleep(max(0.0, started + n * every - time.monotonic()))
        ctx.attempt.expect(next(protocols), "ok", acct.username, acct.password)
    redeemed = ctx.mock.stats()["refreshes"].get(world.DELEGATED_CLIENT_ID, {}).get(acct.mailbox, 0)
    check(redeemed >= 2, f"{redeemed} refresh(es) in {logins * every:.0f}s of 30 s tokens")

    token = subprocess.run(env.proxy_command("token", acct.username), capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    check(token.returncode == 0, f"`token` exited {token.returncode}: {token.stderr.strip()}")
    imap = imaplib.IMAP4_SSL(env.host, env.ports["imaps"], ssl_context=env.tls(), timeout=TIMEOUT)
    typ, _ = imap.authenticate("XOAUTH2", lambda _: f"user={acct.mailbox}\x01auth=Bearer {token.stdout.strip()}\x01\x01".encode())
    check(typ == "OK", "Dovecot refused the token printed by `xoauth2-proxy token`")
    imap.logout()
    return f"{logins} logins, {redeemed} refresh token rotations, `token` accepted by Dovecot"


# ---- local authentication ----------------------------------------------------------

def wrong_password(ctx: Context, protocol: str):
    """A wrong password, and an unknown user, get the auth-failure answer, and the
    token endpoint never hears about either."""
    acct = A["never"]
    answer = ctx.attempt.expect(protocol, "auth-failed", acct.username, acct.password + "x")
    ctx.attempt.expect(protocol, "auth-failed", "nobody-such", acct.password)
    requests = ctx.mock.token_requests("never")
    check(requests == 0, f"the mock saw {requests} token request(s) for a failed local login")
    return answer


per_protocol(wrong_password, "auth-wrong-password")


# ---- the mock's delegated flows (for the proxy's future `login`/`token`) ------------

def device_flow(ctx: Context, scope: str = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"):
    start = ctx.mock.oauth("devicecode", {"client_id": world.DELEGATED_CLIENT_ID, "scope": scope})
    check("device_code" in start and "user_code" in start, f"devicecode answer: {start}")

    def poll() -> dict:
        return ctx.mock.oauth("token", {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                                        "client_id": world.DELEGATED_CLIENT_ID,
                                        "device_code": start["device_code"]})
    return start, poll


@scenario("mock-device-code-flow")
def mock_device_code(ctx: Context):
    """authorization_pending, slow_down, approval (access + refresh token), access_denied,
    expired_token: the answers a device-code client must handle."""
    start, poll = device_flow(ctx)
    check(poll().get("error") == "authorization_pending", "first poll")
    check(poll().get("error") == "slow_down", "an immediate second poll")
    ctx.mock.device(start["user_code"], "approve", user=A["alice"].mailbox)
    time.sleep(start["interval"])
    answer = poll()
    check(len(answer.get("access_token", "")) > 1500 and answer.get("refresh_token"), f"approved: {answer}")
    for action, error in [("deny", "access_denied"), ("expire", "expired_token")]:
        start, poll = device_flow(ctx)
        ctx.mock.device(start["user_code"], action)
        check(poll().get("error") == error, f"after {action}: expected {error}")


@scenario("mock-refresh-token-rotation")
def mock_refresh_rotation(ctx: Context):
    """A refresh token works once and is replaced; the old one is then invalid_grant.
    The delegated access token opens its user's mailbox at Dovecot."""
    alice = A["alice"]
    start, poll = device_flow(ctx)
    ctx.mock.device(start["user_code"], "approve", user=alice.mailbox)
    first = poll()
    check("refresh_token" in first, f"device flow: {first}")

    def refresh(token: str) -> dict:
        return ctx.mock.oauth("token", {"grant_type": "refresh_token", "client_id": world.DELEGATED_CLIENT_ID,
                                        "refresh_token": token, "scope": "offline_access"})
    second = refresh(first["refresh_token"])
    check(second.get("refresh_token") not in (None, first["refresh_token"]), f"no rotation: {second}")
    check(refresh(first["refresh_token"]).get("error") == "invalid_grant", "a redeemed refresh token worked again")
    third = refresh(second["refresh_token"])
    check("access_token" in third, f"the newest refresh token failed: {third}")
    imap = imaplib.IMAP4_SSL(ctx.env.host, ctx.env.ports["imaps"], ssl_context=ctx.env.tls(), timeout=TIMEOUT)
    token = third["access_token"]
    typ, _ = imap.authenticate("XOAUTH2", lambda _: f"user={alice.mailbox}\x01auth=Bearer {token}\x01\x01".encode())
    check(typ == "OK", "Dovecot refused the delegated token")
    imap.logout()


# ---- the upstream is gone (last: stops Dovecot) ------------------------------------

def unavailable(ctx: Context, protocol: str, kind: str, at: str) -> str:
    """Logs in on a listener of `kind`; the answer must be the unavailable row, at `at`."""
    alice = A["alice"]
    came, answer = Attempt(Clients(ctx.env, kind)).run(protocol, alice.username, alice.password)
    check(re.match(ANSWERS["unavailable"][protocol], answer), f"{protocol} {came}: {answer!r}")
    check(came == at, f"{protocol}: the unavailable answer came at the {came}, expected at the {at}")
    return answer.strip()


def upstream_down(ctx: Context, protocol: str, kind: str, at: str):
    """With Dovecot stopped, a client gets the unavailable answer: at login on a listener
    that has cached the upstream's capabilities, as the greeting on one that has not."""
    ctx.stop_dovecot()
    return unavailable(ctx, protocol, kind, at)


per_protocol(upstream_down, "upstream-down-at-login", phase="final", kind="", at="login")
per_protocol(upstream_down, "upstream-down-at-greeting", phase="final", kind="cold", at="greeting")


@scenario("logs-hold-no-secrets", phase="final")
def logs_hold_no_secrets(ctx: Context):
    """After everything else, the proxy's log holds no password, client secret, access
    or refresh token, nor the base64 of a login or of an XOAUTH2 string (DESIGN.md)."""
    log = ctx.logs.since({}, "proxy")

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    secrets = {f"client secret of {i.name}": i.secret for i in IDENTITIES.values()}
    for a in A.values():
        secrets |= {f"password of {a.username}": a.password,
                    f"AUTH PLAIN of {a.username}": b64(f"\0{a.username}\0{a.password}"),
                    f"AUTH LOGIN password of {a.username}": b64(a.password)}
    tokens = ctx.mock.issued_tokens()
    # A token's last 40 characters are random signature bytes: a leak of its end shows.
    secrets |= {f"token #{n}": token[-40:] for n, token in enumerate(tokens)}
    secrets |= {"a JWT header": "eyJ0eXAi", "an XOAUTH2 string in base64": b64("user=")[:7]}
    leaked = [what for what, secret in secrets.items() if secret in log]
    check(not leaked, f"the proxy log contains: {', '.join(leaked)}")
    return f"{len(log.splitlines())} log lines, {len(tokens)} tokens checked"


# ---- runner ------------------------------------------------------------------------

class Runner:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.lock = threading.Lock()
        self.passed: list[str] = []
        self.failed: list[str] = []

    def run(self, item: Scenario) -> None:
        marks = self.ctx.logs.marks()
        started = time.monotonic()
        try:
            detail = item.run(self.ctx)
            line, ok = f"PASS {item.name}" + (f" ({detail})" if detail else ""), True
        except Failed as e:
            line, ok = f"FAIL {item.name}: {e}", False
        except Exception as e:  # a client library's error is a failure too, with its place
            where = traceback.extract_tb(e.__traceback__)[-1]
            line, ok = f"FAIL {item.name}: {type(e).__name__}: {e} (at {where.name}:{where.lineno})", False
        elapsed = time.monotonic() - started
        with self.lock:
            (self.passed if ok else self.failed).append(item.name)
            print(f"{line} [{elapsed:.1f}s]", flush=True)
            if not ok:
                self.print_logs(marks)

    def print_logs(self, marks: dict, lines: int = 15) -> None:
        """What each log said while the scenario ran (its last lines)."""
        for name in self.ctx.logs.paths:
            new = self.ctx.logs.since(marks, name).strip().splitlines()[-lines:]
            for text in new:
                print(f"    {name}| {text}")

    def run_all(self, selected: list[Scenario]) -> None:
        background = [threading.Thread(target=self.run, args=(s,), name=s.name)
                      for s in selected if s.phase == "background"]
        for thread in background:
            thread.start()
        for phase in ["main", "final"]:
            if phase == "final":
                for thread in background:
                    thread.join()
            for item in selected:
                if item.phase == phase:
                    self.run(item)


def main() -> int:
    parser = argparse.ArgumentParser(description="Runs the e2e scenarios against a started environment.")
    parser.add_argument("--env", required=True, help="env.json written by world.py configure")
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    parser.add_argument("patterns", nargs="*", help="shell-style globs of scenario names (default: all)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(s.name + ("" if s.default else "  (only when named: known proxy bug)") for s in SCENARIOS))
        return 0
    # A scenario outside the default run must be named exactly, not caught by a glob.
    selected = [s for s in SCENARIOS
                if (s.default and (not args.patterns or any(fnmatch.fnmatch(s.name, p) for p in args.patterns)))
                or s.name in args.patterns]
    if not selected:
        print(f"no scenario matches {args.patterns}; try --list", file=sys.stderr)
        return 2
    env = Env.load(args.env)
    clients = Clients(env)
    ctx = Context(env, Mock(env), Sink(env), clients, Attempt(clients), Logs(env))
    runner = Runner(ctx)
    runner.run_all(selected)
    print(f"{len(runner.passed)} passed, {len(runner.failed)} failed", flush=True)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
