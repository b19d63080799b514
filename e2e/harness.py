"""What the e2e scenarios share: the run's environment, the mock's control API, the SMTP
sink's store, test messages, the stock Python mail clients pointed at the proxy, curl,
a raw line client for the quirks stock clients do not produce, the site relay (Postfix)
and mbsync, and the table of answers a client must see when a login fails.
"""

import base64
import hashlib
import imaplib
import json
import poplib
import re
import secrets
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import world
from world import IDENTITIES, Account

TIMEOUT = 20  # seconds for any single client operation: a hang is a failure, not a wait


class Failed(Exception):
    """A scenario's expectation did not hold; the message says which."""


def check(condition, message: str) -> None:
    if not condition:
        raise Failed(message)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Polls `predicate` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Failed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)



def device_login(command: list, mock, mailbox: str) -> None:
    """Runs `xoauth2-proxy login` (the device-code flow), approves the code it
    prints at the mock as `mailbox`, and fails the scenario unless it exits 0."""
    login = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        user_code = None
        for line in login.stdout:
            found = re.search(r"enter the code (\S+)", line)
            if found:
                user_code = found.group(1)
                break
        check(user_code is not None, "`login` printed no user code")
        mock.device(user_code, "approve", user=mailbox)
        _, err = login.communicate(timeout=TIMEOUT)
    finally:
        if login.poll() is None:
            login.kill()
    check(login.returncode == 0, f"`login` exited {login.returncode}: {err.strip()}")

# ---- the run ---------------------------------------------------------------------

@dataclass
class Env:
    """env.json, written by `world.py configure` for this run."""

    work: Path
    host: str
    ports: dict
    ca_file: str
    sink_dir: Path
    dovecot_config: str
    logs: dict
    proxy_bin: str
    proxy_config: str
    token_store: Path
    postfix_config: str
    mbsync_dir: Path
    pending: list  # the world.PENDING features this world was rendered with
    check_configs: dict  # name -> path of a config for `check --online` (world.CHECK_CONFIGS)
    prometheus: bool  # run.sh started a Prometheus scraping the proxy (E2E_PROMETHEUS=0: not)
    prometheus_job: str

    @classmethod
    def load(cls, path: str) -> "Env":
        raw = json.loads(Path(path).read_text())
        return cls(work=Path(raw["work"]), host=raw["host"], ports=raw["ports"], ca_file=raw["ca_file"],
                   sink_dir=Path(raw["sink_dir"]), dovecot_config=raw["dovecot_config"], logs=raw["logs"],
                   proxy_bin=raw["proxy_bin"], proxy_config=raw["proxy_config"],
                   token_store=Path(raw["token_store"]), postfix_config=raw["postfix_config"],
                   mbsync_dir=Path(raw["mbsync_dir"]), pending=raw["pending"],
                   check_configs=raw["check_configs"], prometheus=raw["prometheus"],
                   prometheus_job=raw["prometheus_job"])

    def proxy_command(self, *args: str) -> list[str]:
        """The proxy binary with this run's config, for `login` and `token`."""
        return [self.proxy_bin, *args, "-c", self.proxy_config]

    def proxy_port(self, protocol: str, kind: str = "") -> int:
        """A listener of the proxy, of one of world.LISTENER_KINDS."""
        return self.ports[world.proxy_port_name(kind, protocol)]

    def tls(self) -> ssl.SSLContext:
        """Trusts the run's CA: for talking to Dovecot directly."""
        return ssl.create_default_context(cafile=self.ca_file)


class Mock:
    """The mock Entra's control API and direct token requests."""

    def __init__(self, env: Env):
        self.base = f"http://{env.host}:{env.ports['mock']}"
        # Loopback only: an http_proxy in the environment must not carry these requests.
        self.http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, path: str, body: dict | None = None, form: dict | None = None) -> dict:
        data, headers = None, {}
        if body is not None:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        elif form is not None:
            data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with self.http.open(request, timeout=TIMEOUT) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:  # OAuth errors come back as 4xx with a JSON body
            return {"http_status": e.code, **json.loads(e.read() or b"{}")}

    def stats(self) -> dict:
        return self._call("/_control/stats")

    def issued_tokens(self) -> list[str]:
        issued = self._call("/_control/tokens")
        return issued["access_tokens"] + issued["refresh_tokens"]

    def token_requests(self, identity: str) -> int:
        return self.stats()["token_requests"].get(IDENTITIES[identity].client_id, 0)

    def counter(self, table: str, identity: str, key: str) -> int:
        """stats[table][client][key], e.g. ("introspections", "revoke", "inactive")."""
        return self.stats()[table].get(IDENTITIES[identity].client_id, {}).get(key, 0)

    def fault(self, identity: str, mode: str, delay: float = 5, code: int | None = None) -> None:
        self._call("/_control/fault", {"client_id": IDENTITIES[identity].client_id, "mode": mode, "delay": delay,
                                       "code": code})

    def claims(self, identity: str, **claims) -> dict:
        """The claims of the identity's next tokens (roles, scp, aud, tid; None removes one)."""
        return self._call("/_control/claims", {"client_id": IDENTITIES[identity].client_id, "claims": claims})

    def revoke(self, identity: str) -> int:
        return self._call("/_control/revoke", {"client_id": IDENTITIES[identity].client_id})["revoked"]

    def device(self, user_code: str, action: str, user: str | None = None) -> dict:
        return self._call("/_control/device", {"user_code": user_code, "action": action, "user": user})

    def oauth(self, endpoint: str, form: dict) -> dict:
        """POSTs to the tenant's /oauth2/v2.0/{endpoint} as a client would."""
        return self._call(f"/{world.TENANT}/oauth2/v2.0/{endpoint}", form=form)

    def app_token(self, identity: str) -> str:
        """A client-credentials token, fetched directly (not through the proxy)."""
        i = IDENTITIES[identity]
        answer = self.oauth("token", {"grant_type": "client_credentials", "client_id": i.client_id,
                                      "client_secret": i.secret,
                                      "scope": "https://outlook.office365.com/.default"})
        check("access_token" in answer, f"mock refused a client_credentials token: {answer}")
        return answer["access_token"]


class Sink:
    """Messages the SMTP sink stored, looked up by their X-E2E-Id header."""

    def __init__(self, env: Env):
        self.dir = env.sink_dir

    def _index(self) -> dict:
        path = self.dir / "index.jsonl"
        if not path.exists():
            return {}
        entries = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return {e["e2e_id"]: e for e in entries if e["e2e_id"]}

    def wait_for(self, ids: list[str], timeout: float = 30) -> dict:
        """Waits until every id has arrived; returns {id: index entry}."""
        def arrived():
            index = self._index()
            return {i: index[i] for i in ids} if all(i in index for i in ids) else None
        return wait_until(arrived, timeout, f"{len(ids)} message(s) at the SMTP sink", interval=0.2)

    def body(self, entry: dict) -> bytes:
        return (self.dir / entry["file"]).read_bytes()


# ---- messages --------------------------------------------------------------------

RECEIVED = re.compile(rb"\AReceived:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def without_received(data: bytes, by: str = "Dovecot") -> bytes:
    """Dovecot's submission service prepends exactly one (folded) Received: header (and
    so does each relay before it, such as Postfix)."""
    match = RECEIVED.match(data)
    check(match, f"the relayed message does not start with {by}'s Received: header")
    return data[match.end():]


def dot_stuffed(data: bytes) -> bytes:
    """An SMTP DATA body (RFC 5321 4.5.2) with its end-of-data line, for raw sessions."""
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_id() -> str:
    return secrets.token_hex(8)


def message(e2e_id: str, size: int = 0, *, eightbit: bool = False, sender: str = "alice@example.test") -> bytes:
    """A CRLF message with the awkward parts a relay could damage: lines that start with
    a dot (SMTP dot-stuffing, POP3 byte-stuffing), a lone dot, trailing whitespace, a
    long line and, if asked, 8-bit UTF-8. `size` pads the body with base64 lines, like
    an attachment, to about that many bytes."""
    body = [b"Hello from the xoauth2-proxy e2e suite.", b".a line that starts with a dot", b".",
            b"..two dots", b"trailing whitespace \t ", b"x" * 900, b""]
    if eightbit:
        body.insert(1, "8-bit: Grüße, naïve café, 日本語".encode())
    filler = base64.b64encode(secrets.token_bytes(max(0, size) * 3 // 4))
    body += [filler[i:i + 76] for i in range(0, len(filler), 76)]
    headers = [f"From: <{sender}>", "To: <rcpt@example.net>", f"Subject: e2e {e2e_id}",
               f"Message-ID: <{e2e_id}@e2e.example.test>", "Date: Sun, 01 Jan 2023 00:00:00 +0000",
               f"X-E2E-Id: {e2e_id}", "MIME-Version: 1.0",
               f"Content-Type: text/plain; charset={'utf-8' if eightbit else 'us-ascii'}",
               f"Content-Transfer-Encoding: {'8bit' if eightbit else '7bit'}"]
    return b"\r\n".join([h.encode() for h in headers] + [b""] + body) + b"\r\n"


# ---- clients through the proxy ---------------------------------------------------

class Clients:
    """Python's stock mail clients and curl, pointed at the proxy's listeners."""

    def __init__(self, env: Env, kind: str = ""):
        self.env, self.kind = env, kind  # kind: which of world.LISTENER_KINDS

    def imap(self) -> imaplib.IMAP4:
        return imaplib.IMAP4(self.env.host, self.env.proxy_port("imap", self.kind), timeout=TIMEOUT)

    def pop3(self) -> poplib.POP3:
        return poplib.POP3(self.env.host, self.env.proxy_port("pop3", self.kind), timeout=TIMEOUT)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP(self.env.host, self.env.proxy_port("smtp", self.kind), timeout=TIMEOUT)

    def imap_login(self, account: Account) -> imaplib.IMAP4:
        client = self.imap()
        if account.password.isascii():
            client.login(account.username, account.password)
        else:  # imaplib sends LOGIN's arguments as ASCII; SASL PLAIN carries UTF-8 in base64
            client.authenticate("PLAIN", lambda _: f"\0{account.username}\0{account.password}".encode())
        return client

    def append(self, account: Account, data: bytes) -> int:
        """APPENDs to INBOX in a session of its own; returns the message's UID."""
        client = self.imap_login(account)
        try:
            return imap_append(client, data)
        finally:
            client.logout()

    def pop3_empty(self, account: Account) -> None:
        """Deletes every message in the account's maildrop, through the proxy."""
        client = self.pop3()
        client.user(account.username)
        client.pass_(account.password)
        for number in range(1, client.stat()[0] + 1):
            client.dele(number)
        client.quit()

    def curl(self, protocol: str, account: Account, path: str = "", *args: str,
             mechanism: str | None = None) -> tuple[bytes, str]:
        """Runs curl against the proxy; returns (stdout, the verbose transcript).
        `mechanism` becomes --login-options AUTH=..., None leaves curl's default."""
        command = ["curl", "--silent", "--show-error", "--verbose", "--max-time", str(TIMEOUT), "--noproxy", "*",
                   f"{protocol}://{self.env.host}:{self.env.proxy_port(protocol, self.kind)}/{path}",
                   "--user", f"{account.username}:{account.password}", *args]
        if mechanism:
            command += ["--login-options", f"AUTH={mechanism}"]
        result = subprocess.run(command, capture_output=True, timeout=TIMEOUT + 10)
        transcript = result.stderr.decode("utf-8", "replace")
        check(result.returncode == 0, f"curl exited with {result.returncode}: {tail(transcript, 6)}")
        return result.stdout, transcript


def imap_append(client: imaplib.IMAP4, data: bytes) -> int:
    """APPENDs to INBOX; returns the UID from the answer's [APPENDUID validity uid]."""
    typ, answer = client.append("INBOX", None, None, data)
    check(typ == "OK", f"APPEND: {typ} {answer}")
    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", answer[0])
    check(match, f"APPEND answer has no APPENDUID: {answer}")
    return int(match.group(1))


def tail(text: str, lines: int) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def curl_auth_command(transcript: str) -> str:
    """The authentication command curl sent, from its --verbose transcript."""
    # IMAP lines carry curl's tag (A001...); POP3 and SMTP lines do not.
    match = re.search(r"^> (?:A\d+ )?(AUTHENTICATE \S+|AUTH \S+|LOGIN|USER)", transcript, re.MULTILINE)
    check(match, "curl's transcript shows no authentication command")
    return match.group(1)


# ---- a raw line client -------------------------------------------------------------

class Raw:
    """Writes exactly the bytes a scenario gives it, in one write each, and reads the
    answers line by line: for the login quirks stock clients do not produce (HELO, AUTH
    LOGIN with the username inline, IMAP literals, lower-case commands, UTF-8 passwords).
    Every failure message carries the transcript so far."""

    def __init__(self, env: Env, protocol: str, kind: str = "", source: str | None = None):
        # `source`: another loopback address to connect from, whose login throttle
        # records start empty (other scenarios' failures count against 127.0.0.1).
        self.sock = socket.create_connection((env.host, env.proxy_port(protocol, kind)), timeout=TIMEOUT,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")
        self.lines: list[str] = []

    def transcript(self, last: int = 12) -> str:
        return " | ".join(self.lines[-last:])

    def send(self, data: bytes) -> None:
        self.lines.append("C: " + data.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\\r\\n")[:200])
        self.sock.sendall(data)

    def line(self) -> bytes:
        line = self.file.readline(1 << 20)
        self.lines.append("S: " + line.decode("utf-8", "replace").rstrip("\r\n")[:200])
        self.check(line.endswith(b"\r\n"), "the server closed the connection" if not line else "a line without CRLF")
        return line

    def check(self, condition, message: str) -> None:
        check(condition, f"{message} (transcript: {self.transcript()})")

    def expect(self, pattern: bytes, *, exact: bool = False) -> re.Match:
        """The next line matches `pattern` (or equals it with its CRLF, if exact)."""
        line = self.line()
        if exact:
            self.check(line == pattern + b"\r\n", f"expected exactly {pattern!r}, got {line!r}")
            pattern = re.escape(pattern)
        match = re.match(pattern, line)
        self.check(match, f"expected {pattern!r}, got {line!r}")
        return match

    def smtp(self, command: bytes | None, code: int) -> list[bytes]:
        """Sends `command` (if any) and reads a whole (multi-line) reply, which must have
        `code`; returns its lines."""
        if command is not None:
            self.send(command + b"\r\n")
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        self.check(all(line[:3] == str(code).encode() for line in lines),
                   f"expected {code} to {command!r}, got {lines[-1]!r}")
        return lines

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes (an IMAP literal)."""
        data = self.file.read(size)
        self.lines.append(f"S: <{len(data)} bytes>")
        self.check(len(data) == size, f"the server closed the connection inside a {size}-byte literal")
        return data

    def imap(self, tag: bytes, command: bytes | None = None, status: bytes = b"OK") -> list[bytes]:
        """Sends `tag command` (if any) and reads up to the tagged answer, which must have
        `status`; returns the lines before it (untagged answers) and, last, the tagged one."""
        if command is not None:
            self.send(tag + b" " + command + b"\r\n")
        lines = []
        while not (line := self.line()).startswith(tag + b" "):
            lines.append(line)
        self.check(line.rstrip(b"\r\n").split(b" ", 2)[1:2] == [status],
                   f"expected {tag.decode()} {status.decode()}, got {line!r}")
        return lines + [line]

    def pop3(self, command: bytes | None, multiline: bool = False) -> list[bytes]:
        """Sends `command` (if any); the answer must be +OK; returns it, and for a
        multi-line answer its lines up to the lone dot (byte-stuffing undone)."""
        if command is not None:
            self.send(command + b"\r\n")
        self.expect(rb"\+OK")
        lines = []
        while multiline and (line := self.line()) != b".\r\n":
            lines.append(line[1:] if line.startswith(b".") else line)
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def client_hello() -> bytes:
    """The first bytes a TLS client sends (a real ClientHello, from Python's ssl)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        context.wrap_bio(incoming, outgoing).do_handshake()
    except ssl.SSLWantReadError:
        pass  # it waits for the ServerHello; the ClientHello is written
    return outgoing.read()


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


# ---- the site relay: a private Postfix whose relayhost is the proxy -----------------

class Postfix:
    """Submits to the run's Postfix (plain SMTP, mynetworks may relay) and follows each
    message through its log, which says where it went and how."""

    QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")

    def __init__(self, env: Env):
        self.env = env
        self.log = Path(env.logs["postfix"])

    def submit(self, sender: str, recipients: list[str], data: bytes) -> str:
        """Returns the queue ID Postfix gave the message."""
        client = smtplib.SMTP(self.env.host, self.env.ports["postfix"], timeout=TIMEOUT)
        try:
            client.ehlo()
            code, reply = client.mail(sender, ["BODY=8BITMIME"])
            check(code == 250, f"Postfix refused MAIL FROM:<{sender}>: {code} {reply!r}")
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                check(code == 250, f"Postfix refused RCPT TO:<{rcpt}>: {code} {reply!r}")
            code, reply = client.data(data)
            check(code == 250, f"Postfix refused the message: {code} {reply!r}")
            client.quit()
        finally:
            client.close()
        queued = self.QUEUED.search(text(reply))
        check(queued, f"Postfix's answer names no queue ID: {reply!r}")
        return queued.group(1)

    def delivery(self, queue_id: str, recipients: int, timeout: float = 30) -> list[str]:
        """Waits until Postfix's log says `status=sent` for each recipient of the message
        and returns those lines; fails at once, with Postfix's reason, on a deferral or
        a bounce (a retry must not hide a refused relay)."""
        def outcome():
            lines = [line for line in self.log.read_text(errors="replace").splitlines()
                     if f" {queue_id}: to=<" in line]
            failed = [line for line in lines if "status=sent" not in line]
            if failed:
                raise Failed(f"Postfix could not relay {queue_id}: {failed[0].split(': ', 1)[-1]}")
            return lines if len(lines) >= recipients else None
        return wait_until(outcome, timeout, f"Postfix to relay {queue_id}", interval=0.1)

    def lines(self, marks: int, needle: str) -> list[str]:
        """Log lines since byte offset `marks` that contain `needle`."""
        with open(self.log, "rb") as f:
            f.seek(marks)
            return [line for line in f.read().decode("utf-8", "replace").splitlines() if needle in line]


# ---- mbsync ---------------------------------------------------------------------------

def mbsync(env: Env, channel: str) -> str:
    """Runs mbsync with the channel's private config (world.MBSYNC); returns its output."""
    config = env.mbsync_dir / f"{channel}.rc"
    result = subprocess.run(["mbsync", "-c", str(config), "--verbose", channel], capture_output=True,
                            timeout=TIMEOUT * 2, stdin=subprocess.DEVNULL)
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    check(result.returncode == 0, f"mbsync exited {result.returncode}: {tail(output, 8)}")
    return output


def maildir_messages(path: Path) -> list[bytes]:
    """Every message in a Maildir folder (new/ and cur/), in no particular order."""
    return [f.read_bytes() for sub in ("new", "cur") if (path / sub).is_dir() for f in sorted((path / sub).iterdir())]


# ---- what a client sees when a login fails ---------------------------------------

ANSWERS = {
    "auth-failed": {"smtp": r"^535 5\.7\.8\b", "imap": r"^NO \[AUTHENTICATIONFAILED\]", "pop3": r"^-ERR \[AUTH\]"},
    "temporary": {"smtp": r"^454 4\.7\.0\b", "imap": r"^NO \[UNAVAILABLE\]", "pop3": r"^-ERR \[SYS/TEMP\]"},
    "unavailable": {"smtp": r"^421 4\.4\.2\b", "imap": r"^\* BYE \[UNAVAILABLE\]", "pop3": r"^-ERR \[SYS/TEMP\]"},
}


def text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Attempt:
    """One login through the proxy with a stock client, reduced to the server's answer
    line ("OK" on success): "535 5.7.8 ...", "NO [UNAVAILABLE] ...", "-ERR [AUTH] ...".
    `at` says whether the answer came as the greeting or to the login."""

    def __init__(self, clients: Clients):
        self.clients = clients

    def run(self, protocol: str, username: str, password: str) -> tuple[str, str]:
        return getattr(self, protocol)(username, password)

    def smtp(self, username: str, password: str) -> tuple[str, str]:
        try:
            client = self.clients.smtp()
        except smtplib.SMTPConnectError as e:
            return "greeting", f"{e.smtp_code} {text(e.smtp_error)}"
        try:
            client.ehlo()
            client.user, client.password = username, password
            client.auth("PLAIN", client.auth_plain)
            client.quit()
            return "login", "OK"
        except smtplib.SMTPAuthenticationError as e:
            return "login", f"{e.smtp_code} {text(e.smtp_error)}"
        except smtplib.SMTPServerDisconnected as e:
            return "login", f"disconnected without an answer ({e})"
        finally:
            client.close()

    def imap(self, username: str, password: str) -> tuple[str, str]:
        try:
            client = self.clients.imap()
        except imaplib.IMAP4.error as e:  # the greeting was not OK: it is the error
            return "greeting", text(e.args[0])
        try:
            # imaplib's login() keeps only the text of a NO; the status matters here.
            typ, data = client._simple_command("LOGIN", username, client._quote(password))
        except imaplib.IMAP4.abort as e:  # an untagged BYE (imaplib keeps it) or a hang-up
            client.shutdown()
            bye = client.untagged_responses.get("BYE")
            return "login", f"* BYE {text(bye[-1])}" if bye else f"aborted: {e}"
        if typ != "OK":
            client.shutdown()
            return "login", f"{typ} {text(data[-1])}"
        client.logout()
        return "login", "OK"

    def pop3(self, username: str, password: str) -> tuple[str, str]:
        try:
            client = self.clients.pop3()
        except poplib.error_proto as e:
            return "greeting", text(e.args[0])
        try:
            client.user(username)
            client.pass_(password)
            client.quit()
            return "login", "OK"
        except poplib.error_proto as e:
            return "login", text(e.args[0])
        finally:
            client.close()

    def expect(self, protocol: str, kind: str, username: str, password: str) -> str:
        """Logs in and checks the answer is the DESIGN.md row `kind` ("ok" for a
        success); returns it. Only "unavailable" may come as the greeting."""
        at, answer = self.run(protocol, username, password)
        if kind == "ok":
            check(answer == "OK", f"{protocol} login as {username} failed at the {at}: {answer}")
            return answer
        pattern = ANSWERS[kind][protocol]
        check(re.match(pattern, answer), f"{protocol} {at}: expected {pattern!r}, got {answer!r}")
        check(kind == "unavailable" or at == "login", f"{protocol}: the greeting already failed: {answer!r}")
        return answer


# ---- the admin listener and Prometheus ---------------------------------------------

class Admin:
    """The proxy's admin listener (/metrics, /healthz, /readyz) and the run's Prometheus."""

    def __init__(self, env: Env):
        self.env = env
        self.base = f"http://{env.host}:{env.ports['admin']}"
        self.prometheus = f"http://{env.host}:{env.ports['prometheus']}"
        self.http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET to the admin listener."""
        try:
            with self.http.open(self.base + path, timeout=TIMEOUT) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """An instant query through Prometheus' HTTP API: (labels, value) per series."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with self.http.open(url, timeout=TIMEOUT) as response:
            answer = json.loads(response.read())
        check(answer.get("status") == "success", f"Prometheus answered {answer}")
        return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]


# ---- logs --------------------------------------------------------------------------

class Logs:
    """The run's log files, read from a remembered offset: what happened since then."""

    def __init__(self, env: Env):
        self.paths = {name: Path(path) for name, path in env.logs.items()}

    def marks(self) -> dict:
        return {name: path.stat().st_size if path.exists() else 0 for name, path in self.paths.items()}

    def since(self, marks: dict, name: str) -> str:
        with open(self.paths[name], "rb") as f:
            f.seek(marks.get(name, 0))
            return f.read().decode("utf-8", "replace")
