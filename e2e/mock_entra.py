#!/usr/bin/env python3
"""A mock Microsoft Entra ID for the end-to-end suite, with the hooks Dovecot calls.

Entra side (what xoauth2-proxy talks to), per tenant (its ID or its domain):
  POST /{tenant}/oauth2/v2.0/token       grant_type = client_credentials, refresh_token
                                         (rotating: a redeemed refresh token is dead) or
                                         urn:ietf:params:oauth:grant-type:device_code
  POST /{tenant}/oauth2/v2.0/devicecode  starts a device-code flow
  GET  /{tenant}/v2.0/.well-known/openid-configuration
                                         the discovery document `check --online` reads
                                         first (AADSTS90002 / 900023 for other tenants)

Dovecot side (Dovecot stands in for Exchange Online and asks us about each token):
  POST /_dovecot/introspect   passdb 1: is the token active? Answers the tenant's domain
                              as `email`, so Dovecot can check the login's domain.
  POST /_dovecot/grant        passdb 2 (use_grant_password): may this token open this
                              mailbox? App-only tokens carry no mailbox, so this is where
                              "Add-MailboxPermission" is enforced.
  POST /_dovecot/policy       auth policy: refuses any login not made over TLS, which is
                              how the suite proves the proxy used TLS upstream (Dovecot
                              treats loopback as secure, so `ssl = required` cannot).

Control API for the scenarios:
  GET  /_control/stats      counters and token request times, per client_id
  GET  /_control/tokens     every access and refresh token issued (to check logs for leaks)
  POST /_control/fault      {"client_id", "mode", "delay", "code"}: the token endpoint answers
                            500, is `delay` seconds slow, says invalid_grant, or (mode aadsts)
                            answers Entra's error AADSTS`code` for this client;
                            mode introspection_500 makes the introspection of its tokens fail
                            instead, which Dovecot reports as a temporary failure (the way
                            Exchange answers when it throttles); mode none ends the fault
  POST /_control/revoke     {"client_id"}: every access token issued to it becomes inactive
  POST /_control/lifetime   {"client_id", "seconds"}: lifetime of the next tokens
  POST /_control/claims     {"client_id", "roles"?, "scp"?, "aud"?, "tid"?}: claims of its
                            next tokens (a key left out keeps its value; null removes it)
  POST /_control/device     {"user_code", "action": approve|deny|expire, "user"}

The configuration (--config, JSON) names the tenant, its domain, Dovecot's own client
credentials and the app registrations: {client_id: {secret, lifetime, mailboxes,
public, device_interval, roles}}. Tokens are JWT-shaped and about 2,000 characters long,
as real Entra access tokens are, with the claims Exchange reads (aud, tid, roles for
app-only tokens, scp for delegated ones); the signature is random bytes.
"""

import argparse
import base64
import json
import re
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
APP_ROLES = ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(obj) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


class OAuthError(Exception):
    """An error answer in Entra's shape (error, error_description with AADSTS, codes)."""

    def __init__(self, status: int, error: str, aadsts: int, text: str):
        super().__init__(text)
        self.status, self.error, self.aadsts, self.text = status, error, aadsts, text

    def body(self) -> dict:
        now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        return {
            "error": self.error,
            "error_description": f"AADSTS{self.aadsts}: {self.text}\r\nTrace ID: {uuid.uuid4()}\r\n"
            f"Correlation ID: {uuid.uuid4()}\r\nTimestamp: {now}",
            "error_codes": [self.aadsts],
            "timestamp": now,
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        }


# Entra's errors as it words them (Microsoft's "Microsoft Entra authentication and
# authorization error codes" reference; the same texts as testkit's Fault::aadsts):
# code -> (HTTP status, error, description). {client} and {tenant} are filled in.
AADSTS = {
    7000215: (401, "invalid_client", "Invalid client secret provided. Ensure the secret being sent in the request "
              "is the client secret value, not the client secret ID, for a secret added to app '{client}'."),
    7000222: (401, "invalid_client", "The provided client secret keys for app '{client}' are expired. Visit the "
              "Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using "
              "certificate credentials for added security: https://aka.ms/certCreds."),
    700016: (400, "unauthorized_client", "Application with identifier '{client}' was not found in the directory "
             "'{tenant}'. This can happen if the application has not been installed by the administrator of the "
             "tenant or consented to by any user in the tenant. You may have sent your authentication request to "
             "the wrong tenant."),
    65001: (400, "invalid_grant", "The user or administrator has not consented to use the application with ID "
            "'{client}' named 'xoauth2-proxy'. Send an interactive authorization request for this user and resource."),
    700027: (401, "invalid_client", "The certificate with identifier used to sign the client assertion is not "
             "registered on application. [Reason - The key was not found.]"),
    700024: (400, "invalid_client", "Client assertion is not within its valid time range."),
    50173: (400, "invalid_grant", "The provided grant has expired due to it being revoked, a fresh auth token is "
            "needed. The user might have changed or reset their password."),
    700082: (400, "invalid_grant", "The refresh token has expired due to inactivity. The token was issued on "
             "2024-01-02T09:00:00.0000000Z and was inactive for 90.00:00:00."),
    70008: (400, "invalid_grant", "The provided authorization code or refresh token has expired due to inactivity. "
            "Send a new interactive authorization request for this user and resource."),
    70011: (400, "invalid_scope", "The provided request must include a 'scope' input parameter. The provided value "
            "for the input parameter 'scope' is not valid."),
    7000218: (401, "invalid_client", "The request body must contain the following parameter: 'client_assertion' "
              "or 'client_secret'."),
}


def aadsts(code: int, client: str, tenant: str) -> OAuthError:
    status, error, text = AADSTS[code]
    return OAuthError(status, error, code, text.format(client=client, tenant=tenant))


@dataclass
class Token:
    client_id: str
    user: str | None  # None for app-only (client credentials) tokens
    expires_at: float
    revoked: bool = False

    def active(self) -> bool:
        return not self.revoked and time.time() < self.expires_at


@dataclass
class DeviceFlow:
    client_id: str
    user_code: str
    expires_at: float
    interval: float
    state: str = "pending"  # pending | approved | denied | redeemed
    user: str | None = None
    last_poll: float = 0.0


@dataclass
class Stats:
    token_requests: dict = field(default_factory=dict)  # client_id -> every POST to /token
    token_times: dict = field(default_factory=dict)  # client_id -> times of issued tokens
    introspections: dict = field(default_factory=dict)  # client_id -> {"active", "inactive", "failed"}
    grants: dict = field(default_factory=dict)  # client_id -> {"allowed", "denied", "mailboxes": {mailbox: n}}
    policy: dict = field(default_factory=lambda: {"allowed": 0, "refused": 0, "reports": 0})
    refreshes: dict = field(default_factory=dict)  # client_id -> {user: redeemed, "refused": n}

    def bump(self, table: dict, client_id: str, key: str | None = None):
        if key is None:
            table[client_id] = table.get(client_id, 0) + 1
        else:
            inner = table.setdefault(client_id, {})
            inner[key] = inner.get(key, 0) + 1


class Entra:
    """The state behind the HTTP handler; every method runs under one lock."""

    def __init__(self, config: dict):
        self.tenant = config["tenant"]
        self.domain = config["domain"]
        self.dovecot = config["dovecot_client"]
        self.clients = config["clients"]
        self.lock = threading.Lock()
        self.tokens: dict[str, Token] = {}
        self.refresh_tokens: dict[str, tuple[str, str]] = {}  # refresh token -> (client_id, user)
        self.devices: dict[str, DeviceFlow] = {}  # device_code -> flow
        self.faults: dict[str, dict] = {}
        self.claims: dict[str, dict] = {}  # client_id -> claims to set on its next tokens
        self.stats = Stats()

    # ---- issuing -----------------------------------------------------------

    def _lifetime(self, client_id: str) -> int:
        return int(self.clients[client_id].get("lifetime", 3600))

    def _access_token(self, client_id: str, user: str | None) -> tuple[str, int]:
        now = int(time.time())
        lifetime = self._lifetime(client_id)
        claims = {
            "aud": "https://outlook.office365.com",
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "aio": "",
            "app_displayname": f"e2e {client_id}",
            "appid": client_id,
            "appidacr": "1",
            "idp": f"https://sts.windows.net/{self.tenant}/",
            "oid": str(uuid.uuid4()),
            "rh": "0.AAAA" + b64url(secrets.token_bytes(48)) + ".",
            "sub": str(uuid.uuid4()),
            "tid": self.tenant,
            "uti": b64url(secrets.token_bytes(16)),
            "ver": "1.0",
            "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
        }
        if user is None:
            claims["roles"] = list(self.clients[client_id].get("roles", APP_ROLES))
        else:
            claims.update(upn=user, unique_name=user, scp="IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send",
                          aud="https://outlook.office.com")
        # Claims a scenario chose for this client (None removes the claim).
        for key, value in self.claims.get(client_id, {}).items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        header = b64url_json({"typ": "JWT", "alg": "RS256", "x5t": b64url(secrets.token_bytes(20)),
                              "kid": b64url(secrets.token_bytes(20))})
        signature = b64url(secrets.token_bytes(256))
        # Real tokens are 1,500-2,500+ characters; grow the opaque `aio` claim to land there.
        target = 2000 + secrets.randbelow(200)
        body = b64url_json(claims)
        missing = target - len(header) - len(body) - len(signature) - 2
        claims["aio"] = b64url(secrets.token_bytes(max(0, missing)))[: max(0, missing * 3 // 4)]
        token = f"{header}.{b64url_json(claims)}.{signature}"
        self.tokens[token] = Token(client_id, user, now + lifetime)
        self.stats.token_times.setdefault(client_id, []).append(time.time())
        return token, lifetime

    def _token_answer(self, client_id: str, user: str | None, scope: str) -> dict:
        access, lifetime = self._access_token(client_id, user)
        answer = {"token_type": "Bearer", "scope": scope, "expires_in": lifetime,
                  "ext_expires_in": lifetime, "access_token": access}
        if user is not None:
            refresh = "1.AAAA" + b64url(secrets.token_bytes(600))
            self.refresh_tokens[refresh] = (client_id, user)
            answer["refresh_token"] = refresh
        return answer

    # ---- the token endpoint ------------------------------------------------

    def fault_for(self, client_id: str) -> dict:
        with self.lock:
            self.stats.bump(self.stats.token_requests, client_id)
            return dict(self.faults.get(client_id, {}))

    def _client(self, form: dict, secret_required: bool) -> str:
        client_id = form.get("client_id", "")
        client = self.clients.get(client_id)
        if client is None:
            raise OAuthError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found "
                             f"in the directory '{self.tenant}'.")
        secret = form.get("client_secret")
        if secret is None and (secret_required or not client.get("public")):
            raise OAuthError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: "
                             "'client_assertion' or 'client_secret'.")
        if secret is not None and secret != client.get("secret"):
            raise OAuthError(401, "invalid_client", 7000215, "Invalid client secret provided.")
        return client_id

    def known_tenant(self, tenant: str) -> bool:
        return tenant.lower() in (self.tenant.lower(), self.domain.lower())

    def unknown_tenant(self, tenant: str) -> OAuthError:
        """AADSTS900023 for a name that cannot be a tenant (neither a GUID nor a domain),
        AADSTS90002 for one that could but is not known."""
        if "." in tenant or re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", tenant):
            return OAuthError(400, "invalid_tenant", 90002,
                              f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                              "and are signing into the correct cloud.")
        return OAuthError(400, "invalid_tenant", 900023,
                          f"Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid "
                          "external domain.")

    def discovery(self, tenant: str, base: str) -> dict:
        if not self.known_tenant(tenant):
            raise self.unknown_tenant(tenant)
        return {"token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/{self.tenant}/v2.0",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"]}

    def token(self, tenant: str, form: dict) -> dict:
        if not self.known_tenant(tenant):
            raise self.unknown_tenant(tenant)
        grant = form.get("grant_type", "")
        with self.lock:
            if grant == "client_credentials":
                client_id = self._client(form, secret_required=True)
                scope = form.get("scope", "")
                if not scope.endswith("/.default"):
                    raise OAuthError(400, "invalid_scope", 1002012,
                                     f"The provided value for scope {scope} is not valid. Client credential "
                                     "flows must have a scope value with /.default suffixed to the resource "
                                     "identifier.")
                return self._token_answer(client_id, None, scope)
            if grant == "refresh_token":
                client_id = self._client(form, secret_required=False)
                owner = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
                if owner is None or owner[0] != client_id:
                    self.stats.bump(self.stats.refreshes, client_id, "refused")
                    raise OAuthError(400, "invalid_grant", 70008,
                                     "The provided authorization code or refresh token has expired due to "
                                     "inactivity or was already redeemed.")
                self.stats.bump(self.stats.refreshes, client_id, owner[1])
                return self._token_answer(client_id, owner[1], form.get("scope", ""))
            if grant == DEVICE_CODE_GRANT:
                client_id = self._client(form, secret_required=False)
                return self._poll_device(client_id, form.get("device_code", ""), form.get("scope", ""))
        raise OAuthError(400, "unsupported_grant_type", 70003,
                         f"The app requested an unsupported grant type '{grant}'.")

    def invalid_grant(self) -> OAuthError:
        return OAuthError(400, "invalid_grant", 50173,
                          "The provided grant has expired due to it being revoked, a fresh auth token is needed.")

    # ---- device code flow --------------------------------------------------

    def device_code(self, tenant: str, form: dict) -> dict:
        if not self.known_tenant(tenant):
            raise self.unknown_tenant(tenant)
        with self.lock:
            client_id = self._client(form, secret_required=False)
            client = self.clients[client_id]
            interval = float(client.get("device_interval", 5))
            lifetime = int(client.get("device_expires_in", 900))
            device_code = b64url(secrets.token_bytes(96))
            user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
            self.devices[device_code] = DeviceFlow(client_id, user_code, time.time() + lifetime, interval)
            return {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": "https://microsoft.com/devicelogin",
                "expires_in": lifetime,
                "interval": int(interval) if interval.is_integer() else interval,
                "message": f"To sign in, use a web browser to open the page https://microsoft.com/devicelogin "
                           f"and enter the code {user_code} to authenticate.",
            }

    def _poll_device(self, client_id: str, device_code: str, scope: str) -> dict:
        flow = self.devices.get(device_code)
        if flow is None or flow.client_id != client_id or flow.state == "redeemed":
            raise OAuthError(400, "invalid_grant", 70000, "The provided value for the 'device_code' is not valid.")
        now = time.time()
        too_fast = now - flow.last_poll < flow.interval
        flow.last_poll = now
        if now >= flow.expires_at:
            raise OAuthError(400, "expired_token", 70020, "The provided device code has expired.")
        if flow.state == "denied":
            raise OAuthError(400, "access_denied", 70000, "The user has denied access to the app.")
        if too_fast:
            raise OAuthError(400, "slow_down", 70016, "The client is polling too fast; add 5 seconds to the interval.")
        if flow.state == "pending":
            raise OAuthError(400, "authorization_pending", 70016,
                             "OAuth 2.0 device flow error. Authorization is pending. Continue polling.")
        flow.state = "redeemed"
        return self._token_answer(client_id, flow.user, scope)

    def device_action(self, user_code: str, action: str, user: str | None) -> dict:
        with self.lock:
            flow = next((f for f in self.devices.values() if f.user_code == user_code), None)
            if flow is None:
                raise KeyError(user_code)
            if action == "approve":
                flow.state, flow.user = "approved", user
            elif action == "deny":
                flow.state = "denied"
            elif action == "expire":
                flow.expires_at = 0
            else:
                raise ValueError(action)
            return {"user_code": user_code, "state": flow.state}

    # ---- Dovecot hooks -----------------------------------------------------

    def introspect(self, token_text: str) -> dict:
        with self.lock:
            token = self.tokens.get(token_text)
            if token is None:
                return {"active": False, "email": "unknown@invalid.invalid"}
            if self.faults.get(token.client_id, {}).get("mode") == "introspection_500":
                self.stats.bump(self.stats.introspections, token.client_id, "failed")
                raise OAuthError(500, "temporarily_unavailable", 90033, "A transient error has occurred.")
            active = token.active()
            self.stats.bump(self.stats.introspections, token.client_id, "active" if active else "inactive")
            # Dovecot compares only the domain (username_format = %d): the token belongs
            # to this tenant. Which mailbox it may open is the grant hook's question.
            email = token.user or f"{token.client_id}@{self.domain}"
            return {"active": active, "email": email, "client_id": token.client_id,
                    "scope": "https://outlook.office365.com/.default", "exp": int(token.expires_at)}

    def grant(self, form: dict) -> dict:
        if (form.get("client_id"), form.get("client_secret")) != (self.dovecot["id"], self.dovecot["secret"]):
            raise OAuthError(401, "invalid_client", 7000215, "Invalid client secret provided.")
        mailbox = form.get("username", "").lower()
        with self.lock:
            token = self.tokens.get(form.get("password", ""))
            if token is None or not token.active():
                raise OAuthError(400, "invalid_grant", 50173, "The access token is not active.")
            if token.user is not None:
                allowed = token.user.lower() == mailbox
            else:
                allowed = mailbox in (m.lower() for m in self.clients[token.client_id].get("mailboxes", []))
            self.stats.bump(self.stats.grants, token.client_id, "allowed" if allowed else "denied")
            if allowed:
                self.stats.bump(self.stats.grants[token.client_id].setdefault("mailboxes", {}), mailbox)
            if not allowed:
                raise OAuthError(400, "invalid_grant", 50105,
                                 f"The application '{token.client_id}' has no permission on mailbox '{mailbox}'.")
            return {"access_token": form["password"], "token_type": "Bearer",
                    "expires_in": max(1, int(token.expires_at - time.time())), "email": mailbox}

    def policy(self, command: str, request: dict) -> dict:
        with self.lock:
            if command != "allow":
                self.stats.policy["reports"] += 1
                return {}
            # `tls` is Dovecot's %{secured}; in Dovecot 2.3.19's policy JSON it is a boolean
            # that is true only over TLS (a loopback connection counts as secured for
            # `ssl = required`, but not here).
            if request.get("tls") is not True:
                self.stats.policy["refused"] += 1
                return {"status": -1, "msg": "TLS is required"}
            self.stats.policy["allowed"] += 1
            return {"status": 0}

    # ---- control -----------------------------------------------------------

    def set_fault(self, client_id: str, mode: str, delay: float, code: int | None = None) -> dict:
        if mode not in ("none", "500", "slow", "invalid_grant", "introspection_500", "aadsts"):
            raise ValueError(mode)
        if mode == "aadsts" and code not in AADSTS:
            raise ValueError(f"no catalogued AADSTS{code}")
        with self.lock:
            if mode == "none":
                self.faults.pop(client_id, None)
            else:
                self.faults[client_id] = {"mode": mode, "delay": delay, "code": code}
            return {"client_id": client_id, "mode": mode}

    def set_claims(self, client_id: str, claims: dict) -> dict:
        allowed = {"roles", "scp", "aud", "tid"}
        if not set(claims) <= allowed:
            raise ValueError(f"only {sorted(allowed)} can be chosen")
        with self.lock:
            self.claims.setdefault(client_id, {}).update(claims)
            return {"client_id": client_id, "claims": self.claims[client_id]}

    def revoke(self, client_id: str) -> dict:
        with self.lock:
            revoked = 0
            for token in self.tokens.values():
                if token.client_id == client_id and token.active():
                    token.revoked = True
                    revoked += 1
            return {"client_id": client_id, "revoked": revoked}

    def set_lifetime(self, client_id: str, seconds: int) -> dict:
        with self.lock:
            self.clients[client_id]["lifetime"] = int(seconds)
            return {"client_id": client_id, "lifetime": int(seconds)}

    def issued(self) -> dict:
        with self.lock:
            return {"access_tokens": list(self.tokens), "refresh_tokens": list(self.refresh_tokens)}

    def snapshot(self) -> dict:
        with self.lock:
            s = self.stats
            return json.loads(json.dumps({
                "token_requests": s.token_requests, "token_times": s.token_times,
                "introspections": s.introspections, "grants": s.grants, "policy": s.policy,
                "refreshes": s.refreshes,
            }))


class Handler(BaseHTTPRequestHandler):
    server_version = "mock-entra/1"
    # Keep-alive: Dovecot's HTTP clients reuse connections, and every answer has a length.
    protocol_version = "HTTP/1.1"
    entra: Entra  # set on the class by main()

    # ---- plumbing ----------------------------------------------------------

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} mock-entra {fmt % args}\n")
        sys.stderr.flush()

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _form(self) -> dict:
        return {k: v[0] for k, v in parse_qs(self._body().decode(), keep_blank_values=True).items()}

    def _json_body(self) -> dict:
        raw = self._body()
        return json.loads(raw) if raw.strip() else {}

    def _send(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # A client that gave up (the "slow" fault outlasts token_timeout) is expected.
            self.log_message("%s", "client went away before the answer")

    # ---- routes ------------------------------------------------------------

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/_control/stats":
            return self._send(200, self.entra.snapshot())
        if path == "/_control/tokens":
            return self._send(200, self.entra.issued())
        parts = path.strip("/").split("/")
        if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            base = f"http://{self.headers.get('Host', '127.0.0.1')}"
            try:
                return self._send(200, self.entra.discovery(parts[0], base))
            except OAuthError as e:
                return self._send(e.status, e.body())
        self._send(404, {"error": "not_found"})

    def do_POST(self):
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        try:
            if parts[1:] == ["oauth2", "v2.0", "token"]:
                return self._token(parts[0])
            if parts[1:] == ["oauth2", "v2.0", "devicecode"]:
                return self._send(200, self.entra.device_code(parts[0], self._form()))
            if url.path == "/_dovecot/introspect":
                return self._send(200, self.entra.introspect(self._form().get("token", "")))
            if url.path == "/_dovecot/grant":
                return self._send(200, self.entra.grant(self._form()))
            if url.path == "/_dovecot/policy":
                command = parse_qs(url.query).get("command", [""])[0]
                return self._send(200, self.entra.policy(command, self._json_body()))
            if parts[0] == "_control" and len(parts) == 2:
                return self._control(parts[1], self._json_body())
        except OAuthError as e:
            return self._send(e.status, e.body())
        except (KeyError, ValueError) as e:
            return self._send(400, {"error": "bad_request", "detail": repr(e)})
        self._send(404, {"error": "not_found"})

    def _token(self, tenant: str) -> None:
        form = self._form()
        fault = self.entra.fault_for(form.get("client_id", ""))
        mode = fault.get("mode")
        if mode == "slow":
            time.sleep(fault["delay"])
        elif mode == "500":
            return self._send(500, {"error": "temporarily_unavailable", "error_description":
                                    "AADSTS90033: A transient error has occurred. Please try again.",
                                    "error_codes": [90033]})
        elif mode == "invalid_grant":
            raise self.entra.invalid_grant()
        elif mode == "aadsts":
            raise aadsts(fault["code"], form.get("client_id", ""), tenant)
        self._send(200, self.entra.token(tenant, form))

    def _control(self, action: str, body: dict) -> None:
        entra = self.entra
        if action == "fault":
            return self._send(200, entra.set_fault(body["client_id"], body.get("mode", "none"),
                                                   float(body.get("delay", 5)), body.get("code")))
        if action == "claims":
            return self._send(200, entra.set_claims(body["client_id"], body.get("claims", {})))
        if action == "revoke":
            return self._send(200, entra.revoke(body["client_id"]))
        if action == "lifetime":
            return self._send(200, entra.set_lifetime(body["client_id"], body["seconds"]))
        if action == "device":
            return self._send(200, entra.device_action(body["user_code"], body["action"], body.get("user")))
        self._send(404, {"error": "not_found"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON: tenant, domain, dovecot_client, clients")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with open(args.config) as f:
        Handler.entra = Entra(json.load(f))
    # Twenty simultaneous logins make Dovecot open dozens of connections at once; the
    # default listen backlog of 5 would drop some and stall them past Dovecot's timeouts.
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    sys.stderr.write(f"mock-entra listening on 127.0.0.1:{args.port}\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
