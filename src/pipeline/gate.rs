//! The gate in front of Crisp: open, or closed because Crisp refuses us (401/402/403, a
//! 404 for the website, a redirect: a misconfiguration) or because Crisp keeps failing
//! (an outage). While closed nothing is sent, the consumer stops, and a probe reopens it.

use tokio::sync::watch;

/// Why nothing may be sent to Crisp now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Open,
    /// Crisp refuses our credentials, plan, website id, or redirects us: `/readyz` fails.
    Refused,
    /// Crisp keeps failing (transport errors, 5xx): the pod stays ready, since a
    /// restart would not help, but messages wait in the broker instead of cycling.
    Outage,
}

#[derive(Debug)]
pub struct CrispGate {
    state: watch::Sender<GateState>,
}

impl Default for CrispGate {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(GateState::Open),
        }
    }
}

impl CrispGate {
    pub fn state(&self) -> GateState {
        *self.state.borrow()
    }

    pub fn is_open(&self) -> bool {
        self.state() == GateState::Open
    }

    pub fn is_refused(&self) -> bool {
        self.state() == GateState::Refused
    }

    /// Closes the gate for a refusal (which outranks an outage); true when this call
    /// changed the state (so only one log line is written).
    pub fn refuse(&self) -> bool {
        self.set(|s| s != GateState::Refused, GateState::Refused)
    }

    /// Closes an open gate for an outage; true when this call closed it.
    pub fn outage(&self) -> bool {
        self.set(|s| s == GateState::Open, GateState::Outage)
    }

    pub fn accept(&self) {
        self.set(|s| s != GateState::Open, GateState::Open);
    }

    fn set(&self, when: impl Fn(GateState) -> bool, to: GateState) -> bool {
        let changed = self.state.send_if_modified(|s| {
            let change = when(*s);
            if change {
                *s = to;
            }
            change
        });
        if changed {
            use crate::telemetry::metrics;
            metrics::crisp_refused(to == GateState::Refused);
            metrics::crisp_outage(to == GateState::Outage);
        }
        changed
    }

    /// Resolves once the gate is closed, for whatever reason.
    pub async fn closed(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives as long as self, so this cannot fail while we wait.
        let _ = rx.wait_for(|s| *s != GateState::Open).await;
    }
}

/// The "hold" latch: Crisp kept rate limiting one message for its whole retry budget
/// (typically the daily quota is spent). Consumption pauses until the hold ends, so the
/// messages wait in the broker instead of spinning through requeues.
#[derive(Debug)]
pub struct Hold {
    until: watch::Sender<Option<tokio::time::Instant>>,
}

impl Default for Hold {
    fn default() -> Self {
        Self {
            until: watch::Sender::new(None),
        }
    }
}

impl Hold {
    /// Holds until `until` (extending a shorter hold); true when a hold started now.
    pub fn hold_until(&self, until: tokio::time::Instant) -> bool {
        let mut started = false;
        self.until.send_if_modified(|current| match current {
            Some(t) if *t >= until => false,
            Some(_) => {
                *current = Some(until);
                true
            }
            None => {
                *current = Some(until);
                started = true;
                true
            }
        });
        if started {
            crate::telemetry::metrics::holding(true);
        }
        started
    }

    /// The hold's end, if one is active.
    pub fn until(&self) -> Option<tokio::time::Instant> {
        let until = (*self.until.borrow())?;
        (until > tokio::time::Instant::now()).then_some(until)
    }

    pub fn is_holding(&self) -> bool {
        self.until().is_some()
    }

    pub fn clear(&self) {
        if self.until.send_replace(None).is_some() {
            crate::telemetry::metrics::holding(false);
        }
    }

    /// Resolves once a hold is active.
    pub async fn started(&self) {
        let mut rx = self.until.subscribe();
        let _ = rx.wait_for(|u| u.is_some()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_outranks_an_outage_and_a_probe_reopens() {
        let gate = CrispGate::default();
        assert!(gate.is_open());
        assert!(gate.outage());
        assert!(!gate.outage(), "already closed");
        assert_eq!(gate.state(), GateState::Outage);
        assert!(!gate.is_refused(), "an outage keeps the pod ready");
        assert!(gate.refuse());
        assert!(!gate.outage(), "an outage never hides a refusal");
        assert!(gate.is_refused());
        gate.accept();
        assert!(gate.is_open());
    }
}
