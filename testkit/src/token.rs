//! A fake Microsoft identity platform token endpoint on loopback.
//!
//! `POST /{tenant}/oauth2/v2.0/token` issues JWT-shaped access tokens
//! (`header.payload.signature`, base64url, about 2,000 characters, as Entra's
//! are) for the client credentials, refresh token and device code grants, and
//! remembers them, so fake mail servers can check what they are shown. A test
//! chooses the claims that matter to Exchange (`aud`, `tid`, `roles`, `scp`)
//! with [`TokenServer::set_token_shape`]; the signature is random bytes, as
//! only Microsoft can verify a real one anyway.
//! `GET /{tenant}/v2.0/.well-known/openid-configuration` answers as Entra's
//! discovery document does, and AADSTS90002 for a tenant it does not know. The app may authenticate with the secret or with a
//! certificate (a signed client assertion, verified here: signature, thumbprint
//! and claims). Refresh tokens rotate strictly: a refresh token that has been
//! used once is refused, which proves a client keeps the newest one.
//! Faults can be switched on to play an endpoint that is down, slow, or
//! refusing the app; [`Fault::aadsts`] gives each Entra error the proxy maps
//! in Entra's own words.

use crate::http::{self, Request, Response};
use rand::RngExt;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The tenant as configured (Entra accepts a domain or the ID).
pub const TENANT: &str = "test-tenant";
/// The directory (tenant) ID: the `tid` claim, and a second name the endpoints answer to.
pub const TENANT_ID: &str = "5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5b";
/// The `oid` of app-only tokens: the object ID of the Enterprise application
/// (service principal), which `New-ServicePrincipal -ObjectId` needs.
pub const SP_OBJECT_ID: &str = "0c9f3a52-7d1e-4b8a-9e6f-2a4b6c8d0e1f";
/// Exchange Online's audience, as app-only tokens carry it.
pub const EXCHANGE_AUDIENCE: &str = "https://outlook.office365.com";
pub const APP_ROLES: [&str; 3] = ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"];
pub const DELEGATED_SCOPES: &str = "IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "fake~client~secret";
/// Realistic Entra access tokens are 1,500-2,500+ characters.
pub const TOKEN_LENGTH: usize = 2000;

#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer every request with this HTTP status and an HTML body.
    Status(u16),
    /// Wait this long before answering normally.
    Delay(Duration),
    /// Answer with an Entra error document.
    Error { status: u16, error: String, description: String, code: u32 },
    /// Close the connection without answering.
    Hangup,
    /// Answer 200 with a body of this many bytes (a JSON string of padding).
    Oversized(usize),
}

impl Fault {
    /// The error Entra answers with AADSTS`code`, its HTTP status, `error` and
    /// description as Entra words them (from Microsoft's "Microsoft Entra
    /// authentication and authorization error codes" reference, and as peers
    /// quote them in their issue trackers, e.g. MicrosoftDocs/azure-docs and
    /// simonrob/email-oauth2-proxy). Panics for a code it does not know, so a
    /// test cannot silently get a generic error.
    pub fn aadsts(code: u32) -> Fault {
        let (status, error, description) = match code {
            7000215 => (401, "invalid_client", format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'.")),
            7000222 => (401, "invalid_client", format!("The provided client secret keys for app '{CLIENT_ID}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.")),
            700016 => (400, "unauthorized_client", format!("Application with identifier '{CLIENT_ID}' was not found in the directory '{TENANT}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.")),
            90002 => (400, "invalid_request", format!("Tenant '{TENANT}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.")),
            900023 => (400, "invalid_request", format!("Specified tenant identifier '{TENANT}' is neither a valid DNS name, nor a valid external domain.")),
            65001 => (400, "invalid_grant", format!("The user or administrator has not consented to use the application with ID '{CLIENT_ID}' named 'xoauth2-proxy'. Send an interactive authorization request for this user and resource.")),
            700027 => (401, "invalid_client", format!("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '5B2A8E1C4F7D9A3B6E0C2D4F8A1B3C5D7E9F0A2B', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{CLIENT_ID}'.]")),
            700024 => (400, "invalid_client", "Client assertion is not within its valid time range. Current time: 2024-05-02T10:15:06.0000000Z, assertion valid from 2024-05-02T11:20:00.0000000Z, expiry time of assertion 2024-05-02T11:25:00.0000000Z.".to_string()),
            50173 => (400, "invalid_grant", "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password. The grant was issued on '2024-01-10T08:00:00.0000000Z' and the TokensValidFrom date (before which tokens are not valid) for this user is '2024-03-01T09:30:00.0000000Z'.".to_string()),
            700082 => (400, "invalid_grant", "The refresh token has expired due to inactivity. The token was issued on 2024-01-02T09:00:00.0000000Z and was inactive for 90.00:00:00.".to_string()),
            70008 => (400, "invalid_grant", "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.".to_string()),
            70011 => (400, "invalid_scope", "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope https://outlook.office365.com/IMAP.AccessAsApp is not valid.".to_string()),
            7000218 => (401, "invalid_client", "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".to_string()),
            1002012 => (400, "invalid_scope", "The provided value for scope https://outlook.office.com/IMAP.AccessAsUser.All is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).".to_string()),
            500011 => (400, "invalid_resource", format!("The resource principal named https://outlook.office365.com was not found in the tenant named {TENANT}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.")),
            7000112 => (400, "unauthorized_client", format!("Application '{CLIENT_ID}'(xoauth2-proxy) is disabled.")),
            53003 => (400, "invalid_grant", "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.".to_string()),
            50076 => (400, "invalid_grant", "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.".to_string()),
            other => panic!("Fault::aadsts: no catalogued description for AADSTS{other}"),
        };
        Fault::Error { status, error: error.to_string(), description, code }
    }
}

/// The claims of the access tokens the endpoint issues, where Exchange
/// looks: audience, tenant, application permissions (`roles`, app-only
/// tokens) and delegated ones (`scp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenShape {
    pub aud: String,
    pub tid: String,
    /// `None`: no `roles` claim at all.
    pub roles: Option<Vec<String>>,
    /// Space-separated, as Entra writes it; `None`: no `scp` claim.
    pub scp: Option<String>,
    /// An opaque token (as personal Microsoft accounts get) instead of a JWT.
    pub opaque: bool,
}

impl TokenShape {
    /// What a correctly set up app-only registration gets: every application permission.
    pub fn app() -> Self {
        TokenShape {
            aud: EXCHANGE_AUDIENCE.into(),
            tid: TENANT_ID.into(),
            roles: Some(APP_ROLES.iter().map(|r| r.to_string()).collect()),
            scp: None,
            opaque: false,
        }
    }

    /// A delegated token with every delegated permission (`aud` is the
    /// `outlook.office.com` resource the delegated scopes name).
    pub fn delegated() -> Self {
        TokenShape {
            aud: "https://outlook.office.com".into(),
            tid: TENANT_ID.into(),
            roles: None,
            scp: Some(DELEGATED_SCOPES.into()),
            opaque: false,
        }
    }

    /// The app-only shape without one application permission.
    pub fn app_without(role: &str) -> Self {
        let mut shape = Self::app();
        shape.roles = shape.roles.map(|r| r.into_iter().filter(|x| x != role).collect());
        shape
    }
}

#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub expires_at: Instant,
    pub revoked: bool,
    pub scope: String,
}

/// How a scripted device code login ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOutcome {
    Approve,
    Deny,
    Expire,
}

#[derive(Debug, Clone)]
struct DeviceScript {
    /// Polls answered `authorization_pending` before the outcome.
    pending: usize,
    /// Answer `slow_down` once, after the pending polls.
    slow_down: bool,
    outcome: DeviceOutcome,
    interval: u64,
}

#[derive(Debug)]
struct Certificate {
    thumbprint: String,
    public_key: Vec<u8>,
}

#[derive(Debug)]
pub struct State {
    requests: AtomicUsize,
    lifetime_secs: AtomicU64,
    fault: Mutex<Option<Fault>>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    forms: Mutex<Vec<HashMap<String, String>>>,
    /// Refresh tokens: value -> (subject, still usable).
    refresh_tokens: Mutex<HashMap<String, (String, bool)>>,
    device: Mutex<Option<DeviceScript>>,
    device_polls: AtomicUsize,
    certificate: Mutex<Option<Certificate>>,
    jtis: Mutex<Vec<String>>,
    grants: Mutex<HashMap<String, usize>>,
    refused_refresh: AtomicUsize,
    self_url: Mutex<String>,
    /// Claims chosen by the test; `None`: by grant (app-only or delegated).
    shape: Mutex<Option<TokenShape>>,
    discovery_requests: AtomicUsize,
    /// The client secret the app is registered with (a test may rotate it).
    secret: Mutex<String>,
}

fn random_text(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| {
            let c = rng.random_range(0..64u8);
            (match c {
                0..=25 => b'A' + c,
                26..=51 => b'a' + c - 26,
                52..=61 => b'0' + c - 52,
                62 => b'-',
                _ => b'_',
            }) as char
        })
        .collect()
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A token shaped like Entra's v1 access tokens for Exchange Online: an
/// RS256 JWT whose payload carries the claims Entra sets, padded (in the
/// opaque `aio` claim, as real tokens vary there) to [`TOKEN_LENGTH`].
fn jwt(shape: &TokenShape, subject: Option<&str>, lifetime: u64) -> String {
    if shape.opaque {
        // Personal Microsoft accounts get compact opaque tokens such as "EwBAAl3B...".
        return format!("EwB{}", random_text(TOKEN_LENGTH - 3));
    }
    let now = unix_now();
    let mut claims = json!({
        "aud": shape.aud,
        "iss": format!("https://sts.windows.net/{}/", shape.tid),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "aio": "",
        "app_displayname": "xoauth2-proxy",
        "appid": CLIENT_ID,
        "appidacr": "1",
        "idp": format!("https://sts.windows.net/{}/", shape.tid),
        "oid": if subject.is_some() { "3b1e9c7a-5d2f-4a6b-8c0e-1f3a5b7d9e2c" } else { SP_OBJECT_ID },
        "rh": format!("0.AAAA{}.", random_text(60)),
        "sub": random_text(43),
        "tid": shape.tid,
        "uti": random_text(22),
        "ver": "1.0",
    });
    if let Some(roles) = &shape.roles {
        claims["roles"] = json!(roles);
    }
    if let Some(scp) = &shape.scp {
        claims["scp"] = json!(scp);
    }
    if let Some(user) = subject {
        claims["upn"] = json!(user);
        claims["unique_name"] = json!(user);
    }
    let header = b64url(
        json!({"typ": "JWT", "alg": "RS256", "x5t": random_text(27), "kid": random_text(27)}).to_string().as_bytes(),
    );
    let signature = random_text(342); // 256 bytes of RS256 signature, base64url
    let unpadded = b64url(claims.to_string().as_bytes()).len();
    let room = TOKEN_LENGTH.saturating_sub(header.len() + signature.len() + unpadded + 2);
    claims["aio"] = json!(random_text(room * 3 / 4));
    format!("{header}.{}.{signature}", b64url(claims.to_string().as_bytes()))
}

impl State {
    fn issue(&self, scope: &str, subject: Option<&str>) -> (String, u64) {
        let lifetime = self.lifetime_secs.load(Ordering::SeqCst);
        let shape = self.shape.lock().unwrap().clone().unwrap_or_else(|| match subject {
            Some(_) => TokenShape::delegated(),
            None => TokenShape::app(),
        });
        let token = jwt(&shape, subject, lifetime);
        self.tokens.lock().unwrap().insert(
            token.clone(),
            IssuedToken {
                expires_at: Instant::now() + Duration::from_secs(lifetime),
                revoked: false,
                scope: scope.to_string(),
            },
        );
        (token, lifetime)
    }
}

/// Checks tokens shown to a fake mail server.
#[derive(Clone, Debug)]
pub struct TokenValidator(Arc<State>);

impl TokenValidator {
    pub fn is_valid(&self, token: &str) -> bool {
        self.0.tokens.lock().unwrap().get(token).is_some_and(|t| !t.revoked && t.expires_at > Instant::now())
    }
}

pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn entra_error(status: u16, error: &str, code: u32, description: &str) -> Response {
    Response::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: 00000000-0000-0000-0000-000000000000"),
            "error_codes": [code],
        }),
    )
}

fn token_answer(state: &State, scope: &str, refresh_for: Option<&str>) -> Response {
    let (token, lifetime) = state.issue(scope, refresh_for);
    let mut answer = json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token, "scope": scope});
    if let Some(subject) = refresh_for {
        let rt = format!("fake-rt-{}", random_text(900));
        state.refresh_tokens.lock().unwrap().insert(rt.clone(), (subject.to_string(), true));
        answer["refresh_token"] = json!(rt);
    }
    Response::json(200, &answer)
}

/// Checks a client assertion the way Entra does: thumbprint, signature, claims.
fn check_assertion(state: &State, tenant: &str, jwt: &str) -> Result<(), String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else { return Err("not a JWT".into()) };
    let decode = |p: &str| -> Result<serde_json::Value, String> {
        serde_json::from_slice(&b64.decode(p).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
    };
    let (h, c) = (decode(header)?, decode(claims)?);
    let cert = state.certificate.lock().unwrap();
    let cert = cert.as_ref().ok_or("no certificate registered")?;
    if h["x5t#S256"] != cert.thumbprint.as_str() {
        return Err(format!("unknown certificate thumbprint {}", h["x5t#S256"]));
    }
    let alg: &dyn ring::signature::VerificationAlgorithm = match h["alg"].as_str() {
        Some("PS256") => &ring::signature::RSA_PSS_2048_8192_SHA256,
        Some("RS256") => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        other => return Err(format!("unsupported alg {other:?}")),
    };
    let signature = b64.decode(signature).map_err(|e| e.to_string())?;
    ring::signature::UnparsedPublicKey::new(alg, &cert.public_key)
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| "bad signature".to_string())?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expected_aud = format!("{}/{tenant}/oauth2/v2.0/token", state.self_url.lock().unwrap());
    if c["aud"] != expected_aud.as_str() {
        return Err(format!("aud {} is not {expected_aud}", c["aud"]));
    }
    if c["iss"] != CLIENT_ID || c["sub"] != CLIENT_ID {
        return Err("iss/sub are not the client ID".into());
    }
    let exp = c["exp"].as_u64().ok_or("no exp")?;
    let nbf = c["nbf"].as_u64().ok_or("no nbf")?;
    if exp <= now || exp > now + 600 || nbf > now + 60 {
        return Err(format!("bad validity nbf={nbf} exp={exp} now={now}"));
    }
    let jti = c["jti"].as_str().ok_or("no jti")?.to_string();
    let mut seen = state.jtis.lock().unwrap();
    if seen.contains(&jti) {
        return Err("jti replayed".into());
    }
    seen.push(jti);
    Ok(())
}

/// Client authentication: the secret, a certificate assertion, or none (a
/// public client, allowed for delegated grants only).
fn authenticate_client(
    state: &State,
    tenant: &str,
    field: &dyn Fn(&str) -> String,
    public_allowed: bool,
) -> Result<(), Response> {
    if !field("client_assertion").is_empty() {
        if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
            return Err(entra_error(400, "invalid_request", 50027, "Invalid client_assertion_type."));
        }
        return check_assertion(state, tenant, &field("client_assertion")).map_err(|why| {
            entra_error(401, "invalid_client", 700027, &format!("Client assertion failed signature validation: {why}."))
        });
    }
    let secret = field("client_secret");
    if secret.is_empty() && public_allowed {
        return Ok(());
    }
    if secret != *state.secret.lock().unwrap() {
        return Err(entra_error(401, "invalid_client", 7000215, "Invalid client secret provided."));
    }
    Ok(())
}

/// The tenant a path starts with, if the endpoint knows it (by name or ID).
fn known_tenant(path: &str) -> Option<&str> {
    let tenant = path.strip_prefix('/')?.split('/').next()?;
    [TENANT, TENANT_ID].contains(&tenant).then_some(tenant)
}

/// Entra's answer for a tenant it does not know: AADSTS900023 when the name
/// cannot be a tenant at all (neither a GUID nor a domain), else AADSTS90002.
fn unknown_tenant(path: &str) -> Response {
    let tenant = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let plausible =
        tenant.contains('.') || (tenant.len() == 36 && tenant.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    if plausible {
        entra_error(400, "invalid_request", 90002, &format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."))
    } else {
        entra_error(
            400,
            "invalid_request",
            900023,
            &format!(
                "Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid external domain."
            ),
        )
    }
}

/// `/{tenant}/v2.0/.well-known/openid-configuration`, as Entra serves it
/// (the fields a client reads; Entra's has more).
fn discovery(state: &State, path: &str) -> Response {
    let Some(tenant) = known_tenant(path) else { return unknown_tenant(path) };
    let base = state.self_url.lock().unwrap().clone();
    Response::json(
        200,
        &json!({
            "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/{TENANT_ID}/discovery/v2.0/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "issuer": format!("{base}/{TENANT_ID}/v2.0"),
            "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        }),
    )
}

async fn handle(state: Arc<State>, request: Request) -> Option<Response> {
    let fault = state.fault.lock().unwrap().clone();
    if request.method == "GET" && request.path.ends_with("/v2.0/.well-known/openid-configuration") {
        state.discovery_requests.fetch_add(1, Ordering::SeqCst);
        // An endpoint that is down or slow is so for every path; an Entra
        // refusal (Fault::Error) concerns token requests only.
        return match fault {
            Some(Fault::Status(status)) => {
                Some(Response { status, body: b"<html>Service unavailable</html>".to_vec(), content_type: "text/html" })
            }
            Some(Fault::Hangup) => None,
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Some(discovery(&state, &request.path))
            }
            _ => Some(discovery(&state, &request.path)),
        };
    }
    if request.method == "POST" && request.path.ends_with("/oauth2/v2.0/token") {
        state.requests.fetch_add(1, Ordering::SeqCst);
        state.forms.lock().unwrap().push(request.form());
    }
    match fault {
        Some(Fault::Status(status)) => {
            return Some(Response {
                status,
                body: b"<html>Service unavailable</html>".to_vec(),
                content_type: "text/html",
            })
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Error { status, error, description, code }) => {
            return Some(entra_error(status, &error, code, &description))
        }
        Some(Fault::Hangup) => return None,
        Some(Fault::Oversized(len)) => {
            let body = format!("{{\"access_token\":\"{}\"}}", "x".repeat(len));
            return Some(Response { status: 200, body: body.into_bytes(), content_type: "application/json" });
        }
        None => {}
    }
    let form = request.form();
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    let Some(tenant) = known_tenant(&request.path) else { return Some(unknown_tenant(&request.path)) };
    if request.method == "POST" && request.path == format!("/{tenant}/oauth2/v2.0/devicecode") {
        if field("client_id") != CLIENT_ID {
            return Some(entra_error(
                400,
                "unauthorized_client",
                700016,
                "Application was not found in the directory.",
            ));
        }
        let interval = state.device.lock().unwrap().as_ref().map_or(5, |d| d.interval);
        return Some(Response::json(
            200,
            &json!({
                "device_code": "fake-device-code",
                "user_code": "FAKE-CODE",
                "verification_uri": "https://microsoft.com/devicelogin",
                "expires_in": 900,
                "interval": interval,
                "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code FAKE-CODE to authenticate.",
            }),
        ));
    }
    if request.method != "POST" || request.path != format!("/{tenant}/oauth2/v2.0/token") {
        return Some(entra_error(404, "invalid_request", 90002, "Tenant or endpoint not found."));
    }
    if field("client_id") != CLIENT_ID {
        return Some(entra_error(400, "unauthorized_client", 700016, "Application was not found in the directory."));
    }
    let grant = field("grant_type");
    *state.grants.lock().unwrap().entry(grant.clone()).or_default() += 1;
    if field("scope").is_empty() {
        return Some(entra_error(400, "invalid_request", 90014, "The required field 'scope' is missing."));
    }
    let public_allowed = grant != "client_credentials";
    if let Err(refusal) = authenticate_client(&state, tenant, &field, public_allowed) {
        return Some(refusal);
    }
    match grant.as_str() {
        "client_credentials" => Some(token_answer(&state, &field("scope"), None)),
        "refresh_token" => {
            let presented = field("refresh_token");
            let subject = {
                let mut rts = state.refresh_tokens.lock().unwrap();
                match rts.get_mut(&presented) {
                    Some((subject, usable)) if *usable => {
                        *usable = false;
                        Some(subject.clone())
                    }
                    _ => None,
                }
            };
            match subject {
                Some(subject) => Some(token_answer(&state, &field("scope"), Some(&subject))),
                None => {
                    state.refused_refresh.fetch_add(1, Ordering::SeqCst);
                    Some(entra_error(
                        400,
                        "invalid_grant",
                        50173,
                        "The provided grant has expired due to it being revoked.",
                    ))
                }
            }
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            state.device_polls.fetch_add(1, Ordering::SeqCst);
            let outcome = {
                let mut script = state.device.lock().unwrap();
                let Some(s) = script.as_mut() else {
                    return Some(entra_error(400, "invalid_grant", 70000, "No device login in progress."));
                };
                if s.pending > 0 {
                    s.pending -= 1;
                    return Some(entra_error(
                        400,
                        "authorization_pending",
                        70016,
                        "The user has not yet finished authenticating.",
                    ));
                }
                if s.slow_down {
                    s.slow_down = false;
                    return Some(entra_error(400, "slow_down", 70016, "Polling too fast."));
                }
                s.outcome
            };
            match outcome {
                DeviceOutcome::Approve => Some(token_answer(&state, &field("scope"), Some("device-user"))),
                DeviceOutcome::Deny => Some(entra_error(400, "access_denied", 70013, "The user declined the request.")),
                DeviceOutcome::Expire => Some(entra_error(400, "expired_token", 70020, "The device code has expired.")),
            }
        }
        other => Some(entra_error(
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{other}'."),
        )),
    }
}

impl TokenServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind token endpoint");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            requests: AtomicUsize::new(0),
            lifetime_secs: AtomicU64::new(3599),
            fault: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            forms: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
            device: Mutex::new(None),
            device_polls: AtomicUsize::new(0),
            certificate: Mutex::new(None),
            jtis: Mutex::new(Vec::new()),
            grants: Mutex::new(HashMap::new()),
            refused_refresh: AtomicUsize::new(0),
            self_url: Mutex::new(format!("http://{addr}")),
            shape: Mutex::new(None),
            discovery_requests: AtomicUsize::new(0),
            secret: Mutex::new(CLIENT_SECRET.to_string()),
        });
        let handler_state = state.clone();
        let handler: http::Handler = Arc::new(move |request| Box::pin(handle(handler_state.clone(), request)));
        let task = tokio::spawn(http::serve(listener, handler));
        TokenServer { addr, state, task }
    }

    /// What goes in an identity's `authority`.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Token requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The form fields of every token request, in order.
    pub fn forms(&self) -> Vec<HashMap<String, String>> {
        self.state.forms.lock().unwrap().clone()
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// The claims of every token issued from now on; `None` restores the
    /// defaults ([`TokenShape::app`] for client credentials, else
    /// [`TokenShape::delegated`]).
    pub fn set_token_shape(&self, shape: Option<TokenShape>) {
        *self.state.shape.lock().unwrap() = shape;
    }

    /// Discovery document requests (`check --online` makes one per identity).
    pub fn discovery_requests(&self) -> usize {
        self.state.discovery_requests.load(Ordering::SeqCst)
    }

    /// Registers a new client secret for the app, as an admin rotating it
    /// in Entra does: from now on only `secret` is accepted (AADSTS7000215
    /// for any other).
    pub fn rotate_secret(&self, secret: &str) {
        *self.state.secret.lock().unwrap() = secret.to_string();
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state.lifetime_secs.store(lifetime.as_secs(), Ordering::SeqCst);
    }

    pub fn validator(&self) -> TokenValidator {
        TokenValidator(self.state.clone())
    }

    /// Every token issued so far stops being accepted by the fake servers.
    pub fn revoke_all(&self) {
        for t in self.state.tokens.lock().unwrap().values_mut() {
            t.revoked = true;
        }
    }

    pub fn issued(&self) -> Vec<String> {
        self.state.tokens.lock().unwrap().keys().cloned().collect()
    }

    /// Token requests with this grant type so far.
    pub fn grants(&self, grant_type: &str) -> usize {
        self.state.grants.lock().unwrap().get(grant_type).copied().unwrap_or(0)
    }

    /// Refresh requests refused because the token was unknown, used or revoked.
    pub fn refused_refreshes(&self) -> usize {
        self.state.refused_refresh.load(Ordering::SeqCst)
    }

    /// A refresh token for `subject`, as a completed login would have given.
    pub fn seed_refresh_token(&self, subject: &str) -> String {
        let rt = format!("fake-rt-{}", random_text(900));
        self.state.refresh_tokens.lock().unwrap().insert(rt.clone(), (subject.to_string(), true));
        rt
    }

    /// The refresh tokens still usable (the newest of each rotation chain).
    pub fn live_refresh_tokens(&self) -> Vec<String> {
        self.state.refresh_tokens.lock().unwrap().iter().filter(|(_, (_, ok))| *ok).map(|(t, _)| t.clone()).collect()
    }

    /// Every refresh token stops working (password change, revoked sessions).
    pub fn revoke_refresh_tokens(&self) {
        for (_, usable) in self.state.refresh_tokens.lock().unwrap().values_mut() {
            *usable = false;
        }
    }

    /// Scripts the next device code login.
    pub fn script_device_login(&self, pending: usize, slow_down: bool, outcome: DeviceOutcome, interval: u64) {
        *self.state.device.lock().unwrap() = Some(DeviceScript { pending, slow_down, outcome, interval });
    }

    pub fn device_polls(&self) -> usize {
        self.state.device_polls.load(Ordering::SeqCst)
    }

    /// Accepts client assertions signed by `key_pem` (an RSA key) for the
    /// certificate `cert_pem`, as an app registration with an uploaded certificate.
    pub fn register_certificate(&self, cert_pem: &str, key_pem: &str) {
        use base64::Engine;
        use rustls_pki_types::pem::PemObject;
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("certificate PEM");
        let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()));
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).expect("PKCS#8 key PEM");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(key.secret_pkcs8_der()).expect("RSA key");
        let public_key = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
        *self.state.certificate.lock().unwrap() = Some(Certificate { thumbprint, public_key });
    }
}
