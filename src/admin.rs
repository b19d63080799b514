//! The admin listener (`admin: { bind: 127.0.0.1:9464 }`): `/metrics` in
//! the Prometheus text format, `/healthz` (the process serves) and `/readyz`
//! (it can serve logins), over HTTP/1.1 with hyper.
//!
//! It answers GET and HEAD on those three paths and nothing else, with a
//! bound on concurrent connections, on how long a request's head may take
//! and on how long a connection lives, so a scraper or a stray client
//! cannot hold resources the mail listeners need.

use crate::metrics::{Metrics, Snapshot};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Admin connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 16;
/// From the connection (or the previous response) to a complete request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection (a scraper's) is closed after this long, between
/// requests, and a new one opened by the client.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// After the lifetime or a stop: time for the request in progress.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the admin endpoints ask the running proxy.
pub trait Backend: Send + Sync + 'static {
    /// `Ok` when every listener is bound and every identity holds or can
    /// get a token; otherwise the reason, one line, without a secret.
    fn readiness(&self) -> Result<(), String>;
    /// While ready: what works less well than configured (shared state
    /// unreachable, local state serving), for `/readyz`'s `degraded`.
    fn degraded(&self) -> Option<String> {
        None
    }
    /// The values `/metrics` reads at scrape time.
    fn snapshot(&self) -> Snapshot;
}

/// Serves `socket` until `stop` is cancelled; then lets requests in
/// progress finish (for at most [`CLOSE_GRACE`]).
pub async fn serve(
    socket: Arc<TcpListener>,
    metrics: Arc<Metrics>,
    backend: Arc<dyn Backend>,
    stop: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        let place = tokio::select! {
            _ = stop.cancelled() => break,
            place = places.clone().acquire_owned() => place,
        };
        let Ok(place) = place else { break };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        let (tcp, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, backend, stop) = (metrics.clone(), backend.clone(), stop.clone());
        connections.spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&request, &metrics, backend.as_ref());
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            let closing = tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                    return;
                }
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => "lifetime",
                _ = stop.cancelled() => "stop",
            };
            tracing::trace!(why = closing, "closing an admin connection");
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}

/// The response to one request; pure but for what it asks `backend`.
fn answer(request: &Request<Incoming>, metrics: &Metrics, backend: &dyn Backend) -> Response<Full<Bytes>> {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "GET or HEAD\n", head);
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let body = metrics.render(&backend.snapshot());
            respond(StatusCode::OK, prometheus::TEXT_FORMAT, body, head)
        }
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n", head),
        "/readyz" => match backend.readiness() {
            Ok(()) => match backend.degraded() {
                None => respond(StatusCode::OK, "application/json", "{\"ready\":true}\n", head),
                Some(why) => {
                    let body = format!("{}\n", serde_json::json!({"ready": true, "degraded": why}));
                    respond(StatusCode::OK, "application/json", body, head)
                }
            },
            Err(reason) => {
                let body = format!("{}\n", serde_json::json!({"ready": false, "reason": reason}));
                respond(StatusCode::SERVICE_UNAVAILABLE, "application/json", body, head)
            }
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics, /healthz or /readyz\n",
            head,
        ),
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
    head: bool,
) -> Response<Full<Bytes>> {
    let body = if head { Bytes::new() } else { body.into() };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Probes and scrapes must see the state of now.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
