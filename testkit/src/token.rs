//! A fake Microsoft identity platform token endpoint on loopback.
//!
//! `POST /{tenant}/oauth2/v2.0/token` issues opaque tokens of realistic
//! length (about 2,000 characters) for the client credentials, refresh token
//! and device code grants, and remembers them, so fake mail servers can check
//! what they are shown. The app may authenticate with the secret or with a
//! certificate (a signed client assertion, verified here: signature, thumbprint
//! and claims). Refresh tokens rotate strictly: a refresh token that has been
//! used once is refused, which proves a client keeps the newest one.
//! Faults can be switched on to play an endpoint that is down, slow, or
//! refusing the app.

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

pub const TENANT: &str = "test-tenant";
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

impl State {
    fn issue(&self, scope: &str) -> (String, u64) {
        let n = self.requests.load(Ordering::SeqCst);
        let prefix = format!("fake-at-{n}-");
        let token = prefix.clone() + &random_text(TOKEN_LENGTH.saturating_sub(prefix.len()));
        let lifetime = self.lifetime_secs.load(Ordering::SeqCst);
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
    let (token, lifetime) = state.issue(scope);
    let mut answer = json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token, "scope": scope});
    if let Some(subject) = refresh_for {
        let rt = format!("fake-rt-{}", random_text(900));
        state.refresh_tokens.lock().unwrap().insert(rt.clone(), (subject.to_string(), true));
        answer["refresh_token"] = json!(rt);
    }
    Response::json(200, &answer)
}

/// Checks a client assertion the way Entra does: thumbprint, signature, claims.
fn check_assertion(state: &State, jwt: &str) -> Result<(), String> {
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
    let expected_aud = format!("{}/{TENANT}/oauth2/v2.0/token", state.self_url.lock().unwrap());
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
fn authenticate_client(state: &State, field: &dyn Fn(&str) -> String, public_allowed: bool) -> Result<(), Response> {
    if !field("client_assertion").is_empty() {
        if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
            return Err(entra_error(400, "invalid_request", 50027, "Invalid client_assertion_type."));
        }
        return check_assertion(state, &field("client_assertion")).map_err(|why| {
            entra_error(401, "invalid_client", 700027, &format!("Client assertion failed signature validation: {why}."))
        });
    }
    let secret = field("client_secret");
    if secret.is_empty() && public_allowed {
        return Ok(());
    }
    if secret != CLIENT_SECRET {
        return Err(entra_error(401, "invalid_client", 7000215, "Invalid client secret provided."));
    }
    Ok(())
}

async fn handle(state: Arc<State>, request: Request) -> Option<Response> {
    let fault = state.fault.lock().unwrap().clone();
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
    if request.method == "POST" && request.path == format!("/{TENANT}/oauth2/v2.0/devicecode") {
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
    if request.method != "POST" || request.path != format!("/{TENANT}/oauth2/v2.0/token") {
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
    if let Err(refusal) = authenticate_client(&state, &field, public_allowed) {
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
