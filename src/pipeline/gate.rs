//! The "Crisp refuses us" latch: set on 401/402/403 or a 404 for the website, cleared when
//! a probe succeeds. While set, nothing is sent and the consumer stops.

use tokio::sync::watch;

#[derive(Debug)]
pub struct CrispGate {
    refused: watch::Sender<bool>,
}

impl Default for CrispGate {
    fn default() -> Self {
        Self {
            refused: watch::Sender::new(false),
        }
    }
}

impl CrispGate {
    pub fn is_refused(&self) -> bool {
        *self.refused.borrow()
    }

    /// Returns true when this call closed the gate (so only one log line is written).
    pub fn refuse(&self) -> bool {
        let changed = self
            .refused
            .send_if_modified(|r| !std::mem::replace(r, true));
        if changed {
            crate::telemetry::metrics::crisp_refused(true);
        }
        changed
    }

    pub fn accept(&self) {
        if self
            .refused
            .send_if_modified(|r| std::mem::replace(r, false))
        {
            crate::telemetry::metrics::crisp_refused(false);
        }
    }

    /// Resolves once the gate is refused.
    pub async fn refused(&self) {
        let mut rx = self.refused.subscribe();
        // The sender lives as long as self, so this cannot fail while we wait.
        let _ = rx.wait_for(|r| *r).await;
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
