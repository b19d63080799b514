#!/usr/bin/env python3
"""The scale-out scenarios: three proxy replicas sharing one Redis, behind HAProxy.

    python3 e2e/fleet.py --env WORK/env.json [GLOB ...]

e2e/run.sh runs this after scenarios.py, against the same Dovecot and mock Entra. It
starts, on free loopback ports and under WORK/fleet, its own redis-server (no
persistence), HAProxy (round-robin, send-proxy-v2, connecting from 127.0.0.3) and three
replicas (`proxy_protocol_from: [127.0.0.3/32]`), plus a counting TCP relay between the
replicas and Dovecot's submission port (how many SMTP sessions are open upstream). Every
process it starts is stopped by its pid. Clients connect from other loopback addresses
(127.0.0.2, 127.0.0.4), so the replicas' logs show whether they saw the client or HAProxy.

Each scenario prints `PASS fleet-... (measured figures)` or `FAIL ...`; the run ends
with `fleet: N passed, M failed`.
"""

import argparse
import concurrent.futures
import fnmatch
import imaplib
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import world
from harness import TIMEOUT, Env, Failed, Mock, Sink, check, device_login, message, new_id, wait_until
from world import ACCOUNTS as A, HOST

CLIENT_IP = "127.0.0.2"  # where the clients connect from
BALANCER_IP = "127.0.0.3"  # where HAProxy connects to the replicas from
GUESSER_IP = "127.0.0.4"  # the password guesser of fleet-throttle (its own throttle record)
REPLICAS = 3
SESSION_LEASE = 6  # seconds: how fast a dead replica's slots come back
SMTP_CAP = 3
SCENARIOS = ["fleet-real-addresses", "fleet-first-logins", "fleet-smtp-cap", "fleet-throttle",
             "fleet-delegated-rotation", "fleet-sigkill-slots", "fleet-redis-restart"]


def free_ports(n: int) -> list[int]:
    return world.free_ports(n)


class Counter:
    """A TCP relay to Dovecot's submission port that counts open sessions: what the
    upstream sees, whatever the proxies believe."""

    def __init__(self, target: int):
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.open = 0
        self.peak = 0
        self.total = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.peak, self.total = self.open, 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((HOST, self.target), timeout=TIMEOUT)
        except OSError:
            client.close()
            return
        with self.lock:
            self.open += 1
            self.total += 1
            self.peak = max(self.peak, self.open)
        done = threading.Event()

        def pump(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                done.set()

        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()
        done.wait()
        for s in (client, upstream):
            try:
                s.close()
            except OSError:
                pass
        with self.lock:
            self.open -= 1


class Fleet:
    """Redis, HAProxy and the replicas of one run."""

    def __init__(self, env: Env):
        self.env = env
        self.dir = env.work / "fleet"
        self.dir.mkdir(exist_ok=True)
        names = ["redis", "haproxy_imap", "haproxy_smtp"] + [f"r{i}_{p}" for i in range(REPLICAS) for p in ("imap", "smtp")]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.counter = Counter(env.ports["submission"])
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = {f"r{i}": self.dir / f"replica{i}.log" for i in range(REPLICAS)}

    # ---- configuration -------------------------------------------------------------

    def replica_config(self, i: int) -> Path:
        env = self.env
        identity_lines = []
        for name in ("fleet", "fleetfirst", "fleetdel"):
            identity = world.IDENTITIES[name]
            identity_lines += [f"  {name}:", f"    authority: http://{HOST}:{env.ports['mock']}",
                               f"    tenant: {world.TENANT}", f"    client_id: {identity.client_id}",
                               f"    flow: {identity.flow}", f"    min_token_lifetime: {identity.min_token_lifetime}",
                               f"    token_timeout: {identity.token_timeout}"]
            if not identity.delegated:
                identity_lines.append(f"    client_secret: {world.yaml_str(identity.secret)}")
        account_lines = []
        for account in (a for a in A.values() if a.identity in ("fleet", "fleetfirst", "fleetdel")):
            account_lines += [f"  - username: {account.username}", f"    password: {world.yaml_str(account.password)}",
                              f"    mailbox: {account.mailbox}", f"    identity: {account.identity}"]
        listeners = []
        for protocol, upstream in (("imap", f"{HOST}:{env.ports['imaps']}"), ("smtp", f"{HOST}:{self.counter.port}")):
            listeners += [f"  - name: fleet-{protocol}", f"    protocol: {protocol}",
                          f"    bind: {HOST}:{self.ports[f'r{i}_{protocol}']}", f"    upstream: {upstream}",
                          f"    upstream_tls: {'implicit' if protocol == 'imap' else 'starttls'}",
                          "    upstream_timeout: 10s", "    allow_plaintext_auth: true",
                          "    proxy_protocol: true", f"    proxy_protocol_from: [{BALANCER_IP}/32]"]
        store = self.dir / f"store{i}"
        text = "\n".join([
            f"# Replica {i} of the fleet scenarios, written by e2e/fleet.py.", "listeners:", *listeners,
            f"upstream_ca_file: {world.yaml_str(env.ca_file)}", "identities:", *identity_lines,
            "accounts:", *account_lines,
            # The same key on every replica (a fixed test key), each with its own directory.
            "token_store:", f"  path: {world.yaml_str(str(store))}",
            "  key: \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"",
            "state:", "  backend: redis", f"  url: redis://{HOST}:{self.ports['redis']}/0",
            f"  prefix: e2e-{env.work.name}", "  timeout: 1s", f"  session_lease: {SESSION_LEASE}s",
            "  refresh_lock: 15s",
            f"max_sessions_per_mailbox: {{smtp: {SMTP_CAP}, imap: 20, pop3: 20}}", "session_wait: 20s",
            "login_throttle: {free_failures: 3, initial_delay: 1s, max_delay: 4s, forget_after: 1m}",
            "log: {level: info, format: text}", "shutdown_timeout: 2s", ""])
        path = self.dir / f"replica{i}.yaml"
        path.write_text(text)
        return path

    def haproxy_config(self) -> Path:
        lines = ["# HAProxy for the fleet scenarios, written by e2e/fleet.py.", "global", "    maxconn 2000",
                 "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 60s",
                 "    timeout server 60s", "    retries 3", "    option redispatch"]
        for protocol in ("imap", "smtp"):
            lines += [f"frontend {protocol}", f"    bind {HOST}:{self.ports[f'haproxy_{protocol}']}",
                      f"    default_backend replicas_{protocol}", f"backend replicas_{protocol}",
                      "    balance roundrobin", f"    source {BALANCER_IP}"]
            lines += [f"    server r{i} {HOST}:{self.ports[f'r{i}_{protocol}']} send-proxy-v2 "
                      "check check-send-proxy inter 1s fall 1 rise 1" for i in range(REPLICAS)]
        path = self.dir / "haproxy.cfg"
        path.write_text("\n".join(lines) + "\n")
        return path

    # ---- processes -------------------------------------------------------------------

    def _start(self, name: str, command: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs[name] = proc
        return proc

    @staticmethod
    def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
        def up() -> bool:
            check(proc.poll() is None, f"{what} exited with {proc.returncode}")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(up, 30, f"{what} on port {port}")

    def start_redis(self) -> None:
        conf = self.dir / "redis.conf"
        conf.write_text(f"bind {HOST}\nport {self.ports['redis']}\ndir {self.dir}\nsave \"\"\nappendonly no\n"
                        f"daemonize no\nlogfile {self.dir / 'redis.log'}\n")
        proc = self._start("redis", ["redis-server", str(conf)], self.dir / "redis.out")
        self.wait_port(self.ports["redis"], proc, "redis-server")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_replica(self, i: int) -> None:
        config = self.replica_config(i)
        check_run = subprocess.run([self.env.proxy_bin, "check", "-c", str(config)], capture_output=True, text=True,
                                   timeout=60, stdin=subprocess.DEVNULL)
        check(check_run.returncode == 0, f"`check` refused replica {i}: {check_run.stdout}{check_run.stderr}")
        proc = self._start(f"r{i}", [self.env.proxy_bin, "run", "-c", str(config)], self.logs[f"r{i}"])
        for protocol in ("imap", "smtp"):
            self.wait_port(self.ports[f"r{i}_{protocol}"], proc, f"replica {i}")

    def start(self) -> None:
        self.start_redis()
        for i in range(REPLICAS):
            self.start_replica(i)
        proc = self._start("haproxy", ["haproxy", "-db", "-f", str(self.haproxy_config())], self.dir / "haproxy.log")
        for protocol in ("imap", "smtp"):
            self.wait_port(self.ports[f"haproxy_{protocol}"], proc, "haproxy")
        # HAProxy's first checks mark the replicas up.
        time.sleep(1.5)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def redis(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-h", HOST, "-p", str(self.ports["redis"]), *args], capture_output=True,
                              text=True, timeout=10).stdout.strip()

    def log(self, i: int) -> str:
        return self.logs[f"r{i}"].read_text(errors="replace")

    # ---- clients -------------------------------------------------------------------

    def imap(self, source: str = CLIENT_IP) -> imaplib.IMAP4:
        port = self.ports["haproxy_imap"]

        class Client(imaplib.IMAP4):
            def _create_socket(self, timeout):
                return socket.create_connection((HOST, port), timeout, source_address=(source, 0))

        return Client(HOST, port, timeout=TIMEOUT)

    def smtp(self, source: str = CLIENT_IP) -> smtplib.SMTP:
        return smtplib.SMTP(HOST, self.ports["haproxy_smtp"], timeout=TIMEOUT, source_address=(source, 0))

    def direct(self, i: int, protocol: str) -> socket.socket:
        """A connection straight to replica i, as HAProxy would make it (from the
        balancer's address, with a v1 header naming the client)."""
        s = socket.create_connection((HOST, self.ports[f"r{i}_{protocol}"]), TIMEOUT, source_address=(BALANCER_IP, 0))
        s.sendall(f"PROXY TCP4 {CLIENT_IP} {HOST} 40000 {self.ports[f'r{i}_{protocol}']}\r\n".encode())
        return s

    def imap_login(self, account, source: str = CLIENT_IP) -> str:
        client = self.imap(source)
        try:
            typ, _ = client.login(account.username, account.password)
            return typ
        except imaplib.IMAP4.error as e:
            return f"NO {e}"
        finally:
            try:
                client.logout()
            except (imaplib.IMAP4.error, OSError):
                pass


def direct_smtp_login(fleet: Fleet, i: int, account) -> tuple[socket.socket, object]:
    """An SMTP session logged in through replica i directly, left open: the socket and
    its reader."""
    import base64
    s = fleet.direct(i, "smtp")
    f = s.makefile("rb")
    check(f.readline().startswith(b"220"), "no greeting")
    s.sendall(b"EHLO fleet\r\n")
    while not (line := f.readline()).startswith(b"250 "):
        check(line, "EHLO answer cut")
    plain = base64.b64encode(f"\0{account.username}\0{account.password}".encode()).decode()
    s.sendall(f"AUTH PLAIN {plain}\r\n".encode())
    answer = f.readline()
    check(answer.startswith(b"235"), f"login through replica {i}: {answer!r}")
    return s, f


# ---- scenarios -----------------------------------------------------------------------

def real_addresses(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """The replicas log the clients' addresses (127.0.0.2), not HAProxy's (127.0.0.3);
    a connection from an address not in proxy_protocol_from, or without a header, is
    refused and logged."""
    for _ in range(REPLICAS):
        check(fleet.imap_login(A["fleet"]) == "OK", "login through HAProxy")
    seen = [i for i in range(REPLICAS) if re.search(rf"client\.addr={re.escape(CLIENT_IP)}:\d+", fleet.log(i))]
    check(len(seen) == REPLICAS, f"client address in the logs of replicas {seen} only")
    for i in range(REPLICAS):
        check(not re.search(rf"client\.addr={re.escape(BALANCER_IP)}", fleet.log(i)),
              f"replica {i} logged HAProxy's address as a client's")
    # Not a listed balancer: refused at once.
    s = socket.create_connection((HOST, fleet.ports["r0_imap"]), TIMEOUT, source_address=(CLIENT_IP, 0))
    s.settimeout(5)
    check(s.recv(100) == b"", "a connection from an unlisted address got an answer")
    s.close()
    wait_until(lambda: "not list this address" in fleet.log(0), 5, "the refusal in replica 0's log")
    # A listed balancer without a header: refused after the header timeout (5 s).
    s = socket.create_connection((HOST, fleet.ports["r1_imap"]), TIMEOUT, source_address=(BALANCER_IP, 0))
    s.settimeout(15)
    started = time.monotonic()
    check(s.recv(100) == b"", "a connection without a PROXY header got an answer")
    waited = time.monotonic() - started
    s.close()
    check("no valid PROXY protocol header" in fleet.log(1), "no log line for the missing header")
    return f"client.addr={CLIENT_IP} on all {REPLICAS} replicas; unlisted peer refused; no header: closed after {waited:.1f}s"


def first_logins(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """100 concurrent first logins of one account spread over the replicas: exactly one
    token request at the mock."""
    before = mock.token_requests("fleetfirst")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(lambda _: fleet.imap_login(A["fleetfirst"]), range(100)))
    elapsed = time.monotonic() - started
    ok = results.count("OK")
    check(ok == 100, f"{ok}/100 logins succeeded: {sorted(set(results))[:3]}")
    requests = mock.token_requests("fleetfirst") - before
    per_replica = [fleet.log(i).count("user=fleetfirst") for i in range(REPLICAS)]
    check(all(per_replica), f"the logins did not reach every replica: {per_replica}")
    check(requests == 1, f"{requests} token requests for 100 logins on {REPLICAS} replicas")
    return f"100/100 logged in in {elapsed:.1f}s, {requests} token request, log lines per replica {per_replica}"


def smtp_cap(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """8 concurrent SMTP senders of one mailbox through HAProxy: all delivered, never more
    than the SMTP cap (3) open at Dovecot's side at once, however they were spread."""
    fleet.counter.reset()
    ids = [new_id() for _ in range(8)]
    account = A["fleetsend"]

    def send(e2e_id: str) -> float:
        started = time.monotonic()
        with fleet.smtp() as smtp:
            smtp.login(account.username, account.password)
            time.sleep(1.0)  # hold the session, so the senders overlap
            smtp.sendmail(account.mailbox, ["rcpt@example.net"], message(e2e_id, sender=account.mailbox))
        return time.monotonic() - started

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        durations = list(pool.map(send, ids))
    elapsed = time.monotonic() - started
    sink.wait_for(ids)
    peak, total = fleet.counter.peak, fleet.counter.total
    check(peak <= SMTP_CAP, f"{peak} SMTP sessions open upstream at once (cap {SMTP_CAP})")
    check(total >= 8, f"only {total} upstream sessions for 8 senders")
    waited = [d for d in durations if d > 2.0]
    return (f"8/8 delivered in {elapsed:.1f}s, peak {peak} open upstream (cap {SMTP_CAP}), "
            f"{len(waited)} sender(s) waited for a slot, longest session {max(durations):.1f}s")


def throttle(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """Failed logins spread over the replicas are throttled as one: after 3 free
    failures the answers are delayed 1 s, 2 s, 4 s, although each replica saw at most 2."""
    account = A["fleetbad"]
    delays = []
    for _ in range(6):
        client = fleet.imap(GUESSER_IP)
        started = time.monotonic()
        try:
            client.login(account.username, "wrong password")
            raise Failed("a wrong password was accepted")
        except imaplib.IMAP4.error:
            delays.append(time.monotonic() - started)
        finally:
            try:
                client.shutdown()
            except OSError:
                pass
    per_replica = [len(re.findall(r"authentication failure.*user=fleetbad|user=fleetbad.*authentication failure",
                                  fleet.log(i))) for i in range(REPLICAS)]
    check(max(per_replica) <= 2, f"the failures were not spread: {per_replica}")
    check(all(d < 0.9 for d in delays[:3]), f"free failures were delayed: {delays}")
    for d, floor in zip(delays[3:], (0.9, 1.8, 3.6)):
        check(d >= floor, f"failure delays {[round(x, 1) for x in delays]}: the fleet's count was not shared")
    return f"answer delays {[round(d, 1) for d in delays]} s with failures per replica {per_replica}"


def delegated_rotation(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """A delegated account signed in with `login` on replica 0's config; its refresh
    token, rotated by whichever replica refreshes, is the one the others use next: over
    several 30 s token lifetimes logins through every replica work, the mock redeems a
    rotation chain, and never sees a spent refresh token."""
    account = A["fleetdel"]
    config = fleet.dir / "replica0.yaml"
    device_login([fleet.env.proxy_bin, "login", "-c", str(config), account.username], mock, account.mailbox)
    check(fleet.redis("EXISTS", f"e2e-{fleet.env.work.name}:rt:fleetdel:{account.username}") == "1",
          "`login` did not put the refresh token in Redis")

    def refreshes() -> dict:
        return mock.stats()["refreshes"].get(world.DELEGATED_CLIENT_ID, {})

    before = refreshes()
    started = time.monotonic()
    logins = 0
    while time.monotonic() - started < 40:
        check(fleet.imap_login(account) == "OK", f"login {logins + 1} of the delegated account failed")
        logins += 1
        time.sleep(2)
    after = refreshes()
    redeemed = after.get(account.mailbox, 0) - before.get(account.mailbox, 0)
    refused = after.get("refused", 0) - before.get("refused", 0)
    check(redeemed >= 1, f"no refresh in 40 s of 30 s tokens ({after})")
    check(refused == 0, f"{refused} refresh(es) with a spent refresh token: a replica used a stale one")
    served = [fleet.log(i).count("user=fleetdel") > 0 for i in range(REPLICAS)]
    check(all(served), f"not every replica served the delegated account: {served}")
    return f"{logins} logins over {REPLICAS} replicas, {redeemed} rotations, 0 spent tokens refused"


def sigkill_slots(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """A replica killed with SIGKILL holding all 3 SMTP slots of a mailbox: its leases
    expire on their own, and a login through another replica gets a slot within the
    lease time."""
    account = A["fleetkill"]
    sessions = [direct_smtp_login(fleet, 2, account) for _ in range(SMTP_CAP)]
    key = f"e2e-{fleet.env.work.name}:slots:smtp:{account.mailbox}"
    check(fleet.redis("ZCARD", key) == str(SMTP_CAP), f"Redis holds {fleet.redis('ZCARD', key)} leases, not {SMTP_CAP}")
    fleet.stop("r2", signal.SIGKILL)
    killed = time.monotonic()
    for s, _ in sessions:
        s.close()
    s, _ = direct_smtp_login(fleet, 0, account)
    recovered = time.monotonic() - killed
    s.sendall(b"QUIT\r\n")
    s.close()
    check(recovered <= SESSION_LEASE + 2, f"a slot came back after {recovered:.1f}s (lease {SESSION_LEASE}s)")
    check(recovered >= 1.0, f"the login got a slot at once ({recovered:.1f}s): the cap did not hold")
    fleet.start_replica(2)
    return f"slots back {recovered:.1f}s after the SIGKILL (session_lease {SESSION_LEASE}s)"


def redis_restart(fleet: Fleet, mock: Mock, sink: Sink) -> str:
    """Redis stopped and started again (empty): logins through every replica keep working
    throughout, a refresh token rotated meanwhile is written back, and afterwards the
    fleet converges on one token (one request for the fleet again)."""
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def keep_logging_in() -> None:
        while not stop.is_set():
            results.append((time.monotonic(), fleet.imap_login(A["fleet"])))
            time.sleep(0.2)

    worker = threading.Thread(target=keep_logging_in, daemon=True)
    worker.start()
    try:
        time.sleep(1)
        fleet.stop("redis")
        down_at = time.monotonic()
        wait_until(lambda: all("shared state unreachable" in fleet.log(i) for i in range(REPLICAS)), 15,
                   "every replica to notice Redis is gone")
        # Tokens refused upstream while Redis is away: each replica gets its own.
        before = mock.token_requests("fleet")
        mock.revoke("fleet")
        time.sleep(2)
        during = mock.token_requests("fleet") - before
        # A delegated refresh on replica 0 alone rotates its refresh token.
        mock.revoke("fleetdel")
        s = fleet.direct(0, "imap")
        f = s.makefile("rb")
        f.readline()
        d = A["fleetdel"]
        quoted = d.password.replace("\\", "\\\\").replace('"', '\\"')
        s.sendall(f'a LOGIN {d.username} "{quoted}"\r\n'.encode())
        answer = f.readline()
        s.close()
        check(answer.startswith(b"a OK"), f"delegated login on replica 0 while Redis is down: {answer!r}")
        fleet.start_redis()
        up_at = time.monotonic()
        rejoined = wait_until(lambda: all("shared state reachable again" in fleet.log(i) for i in range(REPLICAS)), 15,
                              "every replica to use Redis again") and time.monotonic() - up_at
        rt_key = f"e2e-{fleet.env.work.name}:rt:fleetdel:{d.username}"
        wait_until(lambda: fleet.redis("EXISTS", rt_key) == "1", 10, "the rotated refresh token written back")
        time.sleep(1)
    finally:
        stop.set()
        worker.join(timeout=TIMEOUT)
    failed = [r for _, r in results if r != "OK"]
    check(not failed, f"{len(failed)} of {len(results)} logins failed around the outage: {failed[:3]}")
    # Converged: the next token the fleet needs is requested once, for all replicas.
    before = mock.token_requests("fleet")
    mock.revoke("fleet")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        after_results = list(pool.map(lambda _: fleet.imap_login(A["fleet"]), range(12)))
    check(after_results.count("OK") == 12, f"logins after the outage: {after_results}")
    converged = mock.token_requests("fleet") - before
    check(converged == 1, f"{converged} token requests after Redis returned: the fleet did not converge")
    # The other replicas refresh the delegated account with the token replica 0 rotated.
    refused_before = mock.stats()["refreshes"].get(world.DELEGATED_CLIENT_ID, {}).get("refused", 0)
    mock.revoke("fleetdel")
    for _ in range(REPLICAS):
        check(fleet.imap_login(A["fleetdel"]) == "OK", "delegated login after the outage")
    refused = mock.stats()["refreshes"].get(world.DELEGATED_CLIENT_ID, {}).get("refused", 0) - refused_before
    check(refused == 0, f"{refused} refresh(es) with a spent refresh token after the write-back")
    outage = up_at - down_at
    return (f"{len(results)} logins during a {outage:.1f}s outage, all OK; {during} token request(s) while down "
            f"(one per replica at most), replicas back on Redis {rejoined:.1f}s after it returned, "
            f"then {converged} request for the fleet; rotated refresh token written back, 0 refused")


FUNCS = {"fleet-real-addresses": real_addresses, "fleet-first-logins": first_logins, "fleet-smtp-cap": smtp_cap,
         "fleet-throttle": throttle, "fleet-delegated-rotation": delegated_rotation,
         "fleet-sigkill-slots": sigkill_slots, "fleet-redis-restart": redis_restart}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", required=True)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("globs", nargs="*")
    args = parser.parse_args()
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    chosen = [n for n in SCENARIOS if not args.globs or any(fnmatch.fnmatch(n, g) for g in args.globs)]
    if not chosen:
        return 0
    env = Env.load(args.env)
    mock, sink = Mock(env), Sink(env)
    fleet = Fleet(env)
    passed = failed = 0
    try:
        fleet.start()
        for name in chosen:
            started = time.monotonic()
            try:
                detail = FUNCS[name](fleet, mock, sink)
                passed += 1
                print(f"PASS {name} ({detail}; {time.monotonic() - started:.1f}s)", flush=True)
            except Exception as e:  # a scenario's failure is reported, the others still run
                failed += 1
                reason = str(e) if isinstance(e, Failed) else traceback.format_exc()
                print(f"FAIL {name}: {reason}", flush=True)
                for i in range(REPLICAS):
                    if fleet.logs[f"r{i}"].exists():
                        print(f"  replica {i} log tail:\n    " + "\n    ".join(fleet.log(i).splitlines()[-8:]))
    finally:
        fleet.stop_all()
    print(f"fleet: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
