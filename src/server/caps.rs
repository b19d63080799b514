//! The upstream's pre-login capabilities, learned by a probe connection and
//! cached per listener so that a client's greeting does not cost an upstream
//! round trip each time.

use crate::upstream::UpstreamError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long a probe result is trusted before the next connection re-probes.
pub const CAPABILITY_TTL: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct CapabilityCache {
    /// Held during a probe, so concurrent connections share one.
    state: Mutex<Option<(Instant, Arc<[String]>)>>,
}

impl CapabilityCache {
    pub async fn get<F, Fut>(&self, probe: F) -> Result<Arc<[String]>, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<String>, UpstreamError>>,
    {
        let mut state = self.state.lock().await;
        if let Some((at, caps)) = state.as_ref() {
            if at.elapsed() < CAPABILITY_TTL {
                return Ok(caps.clone());
            }
        }
        match probe().await {
            Ok(caps) => {
                let caps: Arc<[String]> = caps.into();
                *state = Some((Instant::now(), caps.clone()));
                Ok(caps)
            }
            // A stale list is better than refusing the greeting: if the
            // upstream is really down, the login will say so.
            Err(e) => match state.as_ref() {
                Some((_, caps)) => {
                    tracing::warn!(error = %e, "capability probe failed; using the previous list");
                    Ok(caps.clone())
                }
                None => Err(e),
            },
        }
    }
}
