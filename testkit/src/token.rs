//! A fake Microsoft identity platform token endpoint on loopback.
//!
//! `POST /{tenant}/oauth2/v2.0/token` with `grant_type=client_credentials`
//! issues opaque tokens of realistic length (about 2,000 characters) and
//! remembers them, so fake mail servers can check what they are shown.
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
}

#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub expires_at: Instant,
    pub revoked: bool,
    pub scope: String,
}

#[derive(Debug)]
pub struct State {
    requests: AtomicUsize,
    lifetime_secs: AtomicU64,
    fault: Mutex<Option<Fault>>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    forms: Mutex<Vec<HashMap<String, String>>>,
}

impl State {
    fn issue(&self, scope: &str) -> (String, u64) {
        let n = self.requests.load(Ordering::SeqCst);
        let mut rng = rand::rng();
        let prefix = format!("fake-at-{n}-");
        let body: String = (0..TOKEN_LENGTH.saturating_sub(prefix.len()))
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
            .collect();
        let token = prefix + &body;
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
        None => {}
    }
    if request.method != "POST" || request.path != format!("/{TENANT}/oauth2/v2.0/token") {
        return Some(entra_error(404, "invalid_request", 90002, "Tenant or endpoint not found."));
    }
    let form = request.form();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("client_id") != CLIENT_ID {
        return Some(entra_error(400, "unauthorized_client", 700016, "Application was not found in the directory."));
    }
    match field("grant_type") {
        "client_credentials" => {
            if field("client_secret") != CLIENT_SECRET {
                return Some(entra_error(401, "invalid_client", 7000215, "Invalid client secret provided."));
            }
            if field("scope").is_empty() {
                return Some(entra_error(400, "invalid_request", 90014, "The required field 'scope' is missing."));
            }
            let (token, lifetime) = state.issue(field("scope"));
            Some(Response::json(
                200,
                &json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}),
            ))
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
}
