//! Mailbox session slots counted for the whole fleet: the per-protocol caps
//! and the wait for a slot behind one interface ([`SessionSlots`]) that the
//! in-process [`MailboxLimiter`] and the Redis-backed [`FleetSlots`] both
//! implement.
//!
//! A fleet slot is a lease in Redis (`state::SharedState::slot_acquire`),
//! renewed every third of `session_lease` while the session lives; a
//! replica that dies stops renewing, and its slots come back on their own.
//! Every session also holds a place in the local limiter, so that when Redis
//! goes away the local caps already count this replica's sessions.

use super::limits::{MailboxBusy, MailboxGuard, MailboxLimiter};
use crate::protocol::Protocol;
use crate::state::{SharedState, SlotAnswer};
use crate::token::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often a login waiting for a fleet slot asks again.
const POLL: Duration = Duration::from_millis(100);
/// A waiter that has not asked for this long loses its place in the queue
/// (its replica died, or the client went away).
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Where a mailbox's upstream sessions are counted.
pub trait SessionSlots: Send + Sync {
    /// One of `cap` slots of `mailbox` for `protocol`, waiting (first come,
    /// first served) up to `wait`; the slot and how long it took.
    fn acquire<'a>(
        &'a self,
        protocol: Protocol,
        mailbox: &'a str,
        cap: usize,
        wait: Duration,
    ) -> BoxFuture<'a, Result<(SessionSlot, Duration), MailboxBusy>>;
}

/// Holds a session's slot until dropped.
#[derive(Debug)]
pub struct SessionSlot {
    _local: Option<MailboxGuard>,
    _lease: Option<Lease>,
}

impl SessionSlots for MailboxLimiter {
    fn acquire<'a>(
        &'a self,
        protocol: Protocol,
        mailbox: &'a str,
        cap: usize,
        wait: Duration,
    ) -> BoxFuture<'a, Result<(SessionSlot, Duration), MailboxBusy>> {
        Box::pin(async move {
            let (guard, waited) = MailboxLimiter::acquire(self, protocol, mailbox, cap, wait).await?;
            Ok((SessionSlot { _local: Some(guard), _lease: None }, waited))
        })
    }
}

/// A lease in Redis, renewed in the background; given back when dropped.
#[derive(Debug)]
struct Lease {
    renew: tokio::task::AbortHandle,
    state: Arc<SharedState>,
    protocol: Protocol,
    mailbox: String,
    id: String,
}

impl Lease {
    /// Keeps `id` renewed from now on. While Redis is down the renewals
    /// fail and go on; once it is back they re-create the lease, so a
    /// session opened meanwhile counts for the fleet again.
    fn start(state: &Arc<SharedState>, protocol: Protocol, mailbox: &str, id: String) -> Lease {
        let every = state.session_lease / 3;
        let (s, m, i) = (state.clone(), mailbox.to_string(), id.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if s.is_up() {
                    let _ = s.slot_renew(protocol, &m, &i).await;
                }
            }
        });
        Lease { renew: renew.abort_handle(), state: state.clone(), protocol, mailbox: mailbox.to_string(), id }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (state, protocol, mailbox, id) =
            (self.state.clone(), self.protocol, std::mem::take(&mut self.mailbox), std::mem::take(&mut self.id));
        // A release that fails (Redis down) is not retried: the lease expires.
        tokio::spawn(async move {
            let _ = state.slot_release(protocol, &mailbox, &id).await;
        });
    }
}

/// A place in the fleet's queue, left when dropped unless the slot was won.
struct Queued<'a> {
    state: &'a Arc<SharedState>,
    protocol: Protocol,
    mailbox: &'a str,
    id: Option<String>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let (state, protocol, mailbox) = (self.state.clone(), self.protocol, self.mailbox.to_string());
            tokio::spawn(async move {
                let _ = state.slot_release(protocol, &mailbox, &id).await;
            });
        }
    }
}

/// Slots counted in Redis for every replica with the same prefix, falling
/// back to this replica's own counts while Redis is unreachable.
pub struct FleetSlots {
    state: Arc<SharedState>,
    local: Arc<MailboxLimiter>,
}

impl FleetSlots {
    pub fn new(state: Arc<SharedState>, local: Arc<MailboxLimiter>) -> Self {
        FleetSlots { state, local }
    }

    async fn local_slot(
        &self,
        protocol: Protocol,
        mailbox: &str,
        cap: usize,
        wait: Duration,
    ) -> Result<SessionSlot, MailboxBusy> {
        let (guard, _) = self.local.acquire(protocol, mailbox, cap, wait).await?;
        let lease = Lease::start(&self.state, protocol, mailbox, crate::state::new_id());
        Ok(SessionSlot { _local: Some(guard), _lease: Some(lease) })
    }
}

impl SessionSlots for FleetSlots {
    fn acquire<'a>(
        &'a self,
        protocol: Protocol,
        mailbox: &'a str,
        cap: usize,
        wait: Duration,
    ) -> BoxFuture<'a, Result<(SessionSlot, Duration), MailboxBusy>> {
        Box::pin(async move {
            let started = Instant::now();
            let deadline = started + wait;
            let mut queued = Queued { state: &self.state, protocol, mailbox, id: Some(crate::state::new_id()) };
            loop {
                let id = queued.id.clone().unwrap_or_default();
                match self.state.slot_acquire(protocol, mailbox, cap, &id, true, HEARTBEAT).await {
                    Ok(SlotAnswer::Granted) => {
                        queued.id = None;
                        // Counted locally too, without a cap of its own: the fleet's
                        // answer is the one that holds while Redis does.
                        let local = self.local.acquire(protocol, mailbox, usize::MAX, Duration::ZERO).await.ok();
                        let lease = Lease::start(&self.state, protocol, mailbox, id);
                        let slot = SessionSlot { _local: local.map(|(g, _)| g), _lease: Some(lease) };
                        return Ok((slot, started.elapsed()));
                    }
                    Ok(SlotAnswer::Queued(_)) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(MailboxBusy);
                        }
                        tokio::time::sleep(POLL.min(deadline - now)).await;
                    }
                    // Redis is unreachable: this replica's own caps, for the rest of the wait.
                    Err(_) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let slot = self.local_slot(protocol, mailbox, cap, left).await?;
                        return Ok((slot, started.elapsed()));
                    }
                }
            }
        })
    }
}
