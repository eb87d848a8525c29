//! Step 5 as the pipeline runs it: one event through the flow to Crisp, with its
//! retries, holds and profile creation, until Crisp answers or the message must go back.

use super::flow::{self, CrispRoute, Retry};
use super::{Happened, Job, Pipeline};
use crate::crisp::{CrispError, Failure};
use crate::outcome::mask_people_id;
use crate::route::Mapped;
use crate::telemetry::metrics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Pipeline {
    /// Sends one event through the flow, retrying as the flow says; while a hold lasts
    /// the message waits with the pod (it may be the hold's trial), until its hand-back
    /// time or until its channel ends.
    pub(super) async fn deliver(&self, job: &Job) -> Happened {
        let mapped = &job.mapped;
        let hand_back_at = job.hand_back_at;
        // Cancelled when the pipeline stops or the delivery's session ends.
        let give_up = job.acks.give_up();
        let gone = || !job.delivery.acker.usable() || !job.acks.channel().status().connected();
        let not_now = || {
            if gone() {
                Happened::ChannelGone
            } else {
                Happened::NotStarted
            }
        };
        let mut budget = self.flow.budget(hand_back_at);
        // Crisp said `people_not_found` and the profile may be created: the next request
        // creates it (once), then the event is sent again.
        let mut needs_profile = false;
        let mut created_profile = false;
        loop {
            let Ok(permit) = self.flow.permit(&budget, give_up).await else {
                return not_now();
            };
            if gone() {
                // The broker redelivers it on the new channel: posting it now would
                // only make a duplicate (and its trial goes to a message that can settle).
                return Happened::ChannelGone;
            }
            if permit.is_trial() {
                // The key may have been rotated while Crisp refused it.
                self.client.reload_credentials();
            }
            let who = mask_people_id(&mapped.people_id);
            let rule = mapped.rule.to_string();
            if needs_profile {
                // Profile creation goes through the flow like any request, on its own
                // route: a hold on it is tried with a profile creation.
                let permit = permit.for_route(CrispRoute::Profiles);
                let created = tokio::select! {
                    r = Box::pin(self.client.create_profile(&mapped.people_id)) => Some(r),
                    _ = self.abandon.cancelled() => None,
                };
                if let Some(answer) = &created {
                    job.answered(answer);
                }
                let error = match created {
                    None => return Happened::NotStarted,
                    Some(Ok(_)) => {
                        self.flow.succeeded(permit);
                        tracing::info!(rule = %mapped.rule, people_id = %who, "created the missing Crisp profile; sending the event once more");
                        needs_profile = false;
                        created_profile = true;
                        continue;
                    }
                    Some(Err(e)) => e,
                };
                match error.failure {
                    Failure::Refused => {
                        self.refused(permit, &error);
                        budget = self.flow.budget(hand_back_at);
                        continue;
                    }
                    Failure::Transient | Failure::RateLimited => {}
                    _ => {
                        self.flow.answered(permit);
                        tracing::warn!(rule = %mapped.rule, people_id = %who, error = %error, "could not create the missing Crisp profile");
                        return Happened::PeopleNotFound {
                            detail: format!(
                                "no Crisp profile for {who}, and creating it failed: {error}"
                            ),
                            rule,
                        };
                    }
                }
                match self
                    .retry(permit, &mut budget, &error, mapped, give_up)
                    .await
                {
                    Some(happened) => return happened.unwrap_or_else(not_now),
                    None => continue,
                }
            }
            metrics::in_flight(1.0);
            let result = tokio::select! {
                r = self.client.add_event(&mapped.people_id, &mapped.event) => Some(r),
                _ = self.abandon.cancelled() => None,
            };
            metrics::in_flight(-1.0);
            if let Some(answer) = &result {
                job.answered(answer);
            }
            let error = match result {
                None => return Happened::NotStarted,
                Some(Ok(_)) => {
                    self.flow.succeeded(permit);
                    return Happened::Delivered;
                }
                Some(Err(e)) => e,
            };
            match error.failure {
                Failure::Rejected => {
                    self.flow.answered(permit);
                    return Happened::CrispRejected {
                        detail: error.message,
                        rule,
                    };
                }
                Failure::PeopleNotFound
                    if self.settings.create_missing_profiles
                        && !created_profile
                        && mapped.people_id.contains('@') =>
                {
                    self.flow.answered(permit);
                    needs_profile = true;
                }
                Failure::PeopleNotFound => {
                    self.flow.answered(permit);
                    let hint = if self.settings.create_missing_profiles {
                        "and it cannot be created (only emails can)"
                    } else {
                        "set crisp.create_missing_profiles = true to create it"
                    };
                    return Happened::PeopleNotFound {
                        detail: format!("Crisp has no profile for {who}; {hint}"),
                        rule,
                    };
                }
                Failure::Refused => {
                    // Not the message's fault: it waits with the pod for the gate.
                    self.refused(permit, &error);
                    budget = self.flow.budget(hand_back_at);
                }
                Failure::Transient | Failure::RateLimited => {
                    match self
                        .retry(permit, &mut budget, &error, mapped, give_up)
                        .await
                    {
                        Some(happened) => return happened.unwrap_or_else(not_now),
                        None => continue,
                    }
                }
            }
        }
    }

    /// After a transient failure or a rate limit: `None` to try again (after the
    /// backoff, or at the gate with a fresh budget when a hold began); `Some(None)` to
    /// give the message back without counting; `Some(Some(..))` when its budget is spent.
    async fn retry(
        &self,
        permit: flow::Permit<'_>,
        budget: &mut flow::Budget,
        error: &CrispError,
        mapped: &Mapped,
        give_up: &CancellationToken,
    ) -> Option<Option<Happened>> {
        let who = mask_people_id(&mapped.people_id);
        let attempts = budget.attempts() + 1;
        match self.flow.failed(permit, budget, error) {
            Retry::Hold => *budget = self.flow.budget(budget.hand_back_at()),
            Retry::HandBack => {
                tracing::info!(rule = %mapped.rule, people_id = %who, attempts, error = %error, "handing the message back before the broker's consumer timeout (amqp.consumer_timeout)");
                return Some(None);
            }
            Retry::Exhausted => {
                tracing::warn!(rule = %mapped.rule, people_id = %who, attempts, error = %error, "giving up for now after max_retry_time; requeueing");
                return Some(Some(Happened::RetriesExhausted));
            }
            Retry::After(wait) => {
                tracing::debug!(rule = %mapped.rule, people_id = %who, wait_ms = wait.as_millis() as u64, error = %error, "retrying");
                metrics::retry();
                if !self.wait_to_retry(wait, give_up).await {
                    return Some(None);
                }
                if !self.flow.state().is_sending() {
                    *budget = self.flow.budget(budget.hand_back_at());
                }
            }
        }
        None
    }

    /// Waits out a retry's backoff; false when the message must give up instead. A hold
    /// that begins meanwhile ends the wait (the message then waits at the gate).
    async fn wait_to_retry(&self, wait: Duration, give_up: &CancellationToken) -> bool {
        Box::pin(async {
            tokio::select! {
                _ = tokio::time::sleep(wait) => true,
                _ = give_up.cancelled() => false,
                _ = self.flow.closed() => true,
            }
        })
        .await
    }

    fn refused(&self, permit: flow::Permit<'_>, error: &CrispError) {
        if self.flow.refused(permit) {
            tracing::error!(status = error.status, reason = error.reason.as_deref(), error = %error, "Crisp refuses our requests; holding until a trial request gets through (messages wait with the pod, nothing is dead-lettered)");
        }
    }
}
