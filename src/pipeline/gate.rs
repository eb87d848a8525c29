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
