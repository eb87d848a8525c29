//! What one request and one message get from the flow (see [`super`]): a permit to
//! send, a retry budget, and what to do after a failure.

use super::*;

/// One message's retry budget, and when it must be handed back at the latest.
#[derive(Debug)]
pub struct Budget {
    pub(super) started: Instant,
    pub(super) attempt: u32,
    /// Requests accepted pod-wide when this message started: when its budget runs out
    /// with this unchanged, nothing got through for anyone (an outage).
    pub(super) accepted_before: u64,
    /// Before the broker's consumer timeout would close the channel holding it.
    pub(super) hand_back_at: Instant,
}

impl Budget {
    /// Retries so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn hand_back_at(&self) -> Instant {
        self.hand_back_at
    }
}

/// Permission to send one request: a concurrency slot and a pacing turn, or a hold's
/// trial. Dropped without an answer ([`Flow::succeeded`], [`Flow::answered`]), a trial
/// counts as failed.
pub struct Permit<'a> {
    pub(super) flow: &'a Flow,
    pub(super) _slot: Slot<'a>,
    pub(super) sent_at: Instant,
    /// The hold generation this is the trial of.
    pub(super) trial: Option<u64>,
    pub(super) route: CrispRoute,
    pub(super) answered: bool,
}

impl Permit<'_> {
    /// This request is a hold's trial.
    pub fn is_trial(&self) -> bool {
        self.trial.is_some()
    }

    /// The request goes to `route` (events unless said otherwise).
    pub fn for_route(mut self, route: CrispRoute) -> Self {
        self.route = route;
        self
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let (Some(generation), false) = (self.trial, self.answered) {
            self.flow.trial_failed(generation);
        }
    }
}

/// Why nothing may be sent for a message now: stopping, or its hand-back time came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotNow;

/// What to do after a transient failure or a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again after this long.
    After(Duration),
    /// A hold began (or goes on): wait for the gate with a fresh budget; the message
    /// stays with the pod.
    Hold,
    /// The message's hand-back time comes before the next try: give it back now.
    HandBack,
    /// The budget ran out while other messages got through: the message's own problem.
    Exhausted,
}
