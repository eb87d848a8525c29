//! Holds and their trials (see [`super`]): closing the gate, one trial at a time with
//! waits that grow, and what each trial's fate does to the hold.

use super::*;

impl Flow {
    /// Lets go of a trial taken for a message that will not be sent after all (stopping,
    /// handed back): another waiting message takes it, at once.
    pub(super) fn give_up<T>(&self, trial: Option<u64>) -> Result<T, NotNow> {
        if let Some(generation) = trial {
            self.release_trial(generation);
        }
        Err(NotNow)
    }

    /// The trial of hold `of` is free again, without counting as failed.
    pub(super) fn release_trial(&self, of: u64) {
        self.published.send_if_modified(|p| match &mut p.gate {
            Gate::Closed {
                trial_out,
                generation,
                ..
            } if *trial_out && *generation == of => {
                *trial_out = false;
                true
            }
            _ => false,
        });
    }

    pub(super) fn take_trial(&self, now: Instant, of: u64) -> bool {
        let mut taken = false;
        self.published.send_if_modified(|p| {
            if let Gate::Closed {
                trial_at,
                trial_out,
                generation,
                ..
            } = &mut p.gate
            {
                if !*trial_out && *trial_at <= now && *generation == of && !p.dead_letters_blocked {
                    *trial_out = true;
                    taken = true;
                }
            }
            taken
        });
        taken
    }

    /// A trial of hold `of` went unanswered or failed: the next waits longer.
    pub(super) fn trial_failed(&self, of: u64) {
        let trials = self.settings.trials;
        let mut next = None;
        self.published.send_if_modified(|p| match &mut p.gate {
            Gate::Closed {
                trial_at,
                trial_out,
                failed_trials,
                generation,
                ..
            } if *trial_out && *generation == of => {
                *trial_out = false;
                *failed_trials = failed_trials.saturating_add(1);
                let wait = trials.delay(*failed_trials);
                *trial_at = (*trial_at).max(Instant::now() + wait);
                next = Some(wait);
                true
            }
            _ => false,
        });
        if let Some(wait) = next {
            tracing::info!(
                next_trial_ms = wait.as_millis() as u64,
                "the trial request did not get through; trying again later"
            );
        }
    }

    /// Closes the gate for `why` (or raises its reason); the first trial waits at least
    /// until `not_before`. True when this call closed it or raised its reason.
    pub(super) fn close(&self, why: Hold, route: CrispRoute, not_before: Option<Instant>) -> bool {
        let now = Instant::now();
        // A hold that comes back soon after the last one ended goes on from there.
        let carried = self
            .reopened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|r| now.duration_since(r.at) < TRIAL_MAX)
            .map_or(0, |r| r.failed_trials.saturating_add(1));
        let first_wait = self.settings.trials.delay(carried);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let mut closed = false;
        let mut raised = false;
        self.published.send_if_modified(|p| match &mut p.gate {
            Gate::Open => {
                let at = now + first_wait;
                p.gate = Gate::Closed {
                    why,
                    route,
                    generation,
                    trial_at: not_before.map_or(at, |n| n.max(at)),
                    trial_out: false,
                    failed_trials: carried,
                };
                closed = true;
                true
            }
            Gate::Closed {
                why: current,
                route: current_route,
                trial_at,
                ..
            } => {
                let mut changed = false;
                if why > *current {
                    *current = why;
                    *current_route = route;
                    raised = true;
                    changed = true;
                }
                if let Some(n) = not_before.filter(|n| n > trial_at) {
                    *trial_at = n;
                    changed = true;
                }
                changed
            }
        });
        if closed || raised {
            self.export_hold();
        }
        closed || raised
    }

    /// The hold gauges, from the gate itself (a block of dead letters, which outranks
    /// it in [`FlowState`], must not hide it).
    pub(super) fn export_hold(&self) {
        let why = match self.published.borrow().gate {
            Gate::Closed { why, .. } => Some(why),
            Gate::Open => None,
        };
        metrics::crisp_refused(why == Some(Hold::Refused));
        metrics::crisp_outage(why == Some(Hold::Outage));
        metrics::holding(why == Some(Hold::Quota));
    }
}
