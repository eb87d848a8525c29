//! The flow on a paused clock: pacing, holds and their trials, budgets.

use super::super::pacing::WINDOW;
use super::*;
use std::collections::VecDeque;

fn config(max_rps: f64) -> DeliveryConfig {
    DeliveryConfig {
        concurrency: 8,
        max_requests_per_second: max_rps,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        max_retry_time: Duration::from_secs(10),
        ..DeliveryConfig::default()
    }
}

fn error(failure: Failure, retry_after: Option<Duration>) -> CrispError {
    CrispError {
        failure,
        status: Some(429),
        reason: None,
        retry_after,
        message: "test".into(),
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

#[tokio::test(start_paused = true)]
async fn the_ceiling_spaces_requests() {
    let flow = Flow::new(&config(10.0));
    let stop = CancellationToken::new();
    let start = Instant::now();
    for _ in 0..5 {
        let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
        flow.succeeded(p);
    }
    assert_eq!(start.elapsed(), Duration::from_millis(400));
    assert_eq!(flow.state(), FlowState::Open);
}

#[tokio::test(start_paused = true)]
async fn retry_after_pauses_every_request() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    let mut budget = flow.budget(far());
    let p = flow.permit(&budget, &stop).await.unwrap();
    let e = error(Failure::RateLimited, Some(Duration::from_secs(3)));
    assert_eq!(
        flow.failed(p, &mut budget, &e),
        Retry::After(Duration::from_secs(3))
    );
    let start = Instant::now();
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    flow.succeeded(p);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

/// Sends as fast as the flow allows for `secs`, against a limit of `limit` requests
/// in any 1 s window (None: no limit); returns (accepted, refused).
async fn run(flow: &Flow, limit: Option<usize>, secs: u64) -> (usize, usize) {
    let stop = CancellationToken::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut window: VecDeque<Instant> = VecDeque::new();
    let (mut ok, mut refused) = (0, 0);
    while Instant::now() < end {
        let mut budget = flow.budget(far());
        let p = flow.permit(&budget, &stop).await.unwrap();
        let now = Instant::now();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        if limit.is_some_and(|l| window.len() >= l) {
            refused += 1;
            let _ = flow.failed(p, &mut budget, &error(Failure::RateLimited, None));
        } else {
            window.push_back(now);
            ok += 1;
            flow.succeeded(p);
        }
        // Crisp answers in 1 ms.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (ok, refused)
}

#[tokio::test(start_paused = true)]
async fn converges_on_a_limit_and_finds_a_lifted_one() {
    let flow = Flow::new(&config(0.0));
    let _ = run(&flow, Some(50), 10).await;
    assert_eq!(flow.state(), FlowState::Throttled);
    let (ok, refused) = run(&flow, Some(50), 30).await;
    let achieved = ok as f64 / 30.0;
    assert!(achieved >= 0.95 * 50.0, "achieved {achieved}/s");
    assert!(
        (refused as f64) <= 0.03 * (ok + refused) as f64,
        "{refused} refused of {}",
        ok + refused
    );
    // The limit is lifted: within 10 s the rate is above ten times the old one.
    let _ = run(&flow, None, 10).await;
    assert!(
        flow.rate().is_none_or(|r| r > 500.0),
        "rate {:?}",
        flow.rate()
    );
}

#[tokio::test(start_paused = true)]
async fn the_ceiling_bounds_the_learned_rate() {
    let flow = Flow::new(&config(20.0));
    let (ok, _) = run(&flow, None, 10).await;
    assert!(ok <= 201, "{ok}");
}

/// Retries one message until the flow stops saying `After`.
async fn retry_until_not_after(flow: &Flow, failure: Failure) -> Retry {
    let stop = CancellationToken::new();
    let mut budget = flow.budget(far());
    loop {
        let p = flow.permit(&budget, &stop).await.unwrap();
        match flow.failed(p, &mut budget, &error(failure, None)) {
            Retry::After(d) => tokio::time::sleep(d).await,
            other => return other,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_spent_quota_holds_and_nothing_getting_through_is_an_outage() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    assert_eq!(
        retry_until_not_after(&flow, Failure::RateLimited).await,
        Retry::Hold
    );
    let FlowState::Held { until } = flow.state() else {
        panic!("{:?}", flow.state())
    };
    // Nothing but the trial goes, and only at `until`.
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(p.is_trial());
    assert!(Instant::now() >= until);
    flow.succeeded(p);
    assert_eq!(flow.state(), FlowState::Throttled);

    assert_eq!(
        retry_until_not_after(&flow, Failure::Transient).await,
        Retry::Hold
    );
    assert_eq!(flow.state(), FlowState::Outage);
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(flow.refused(p), "a refusal outranks an outage");
    assert_eq!(flow.state(), FlowState::Refused);
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(p.is_trial());
    flow.answered(p);
    assert!(flow.state().is_sending());
}

#[tokio::test(start_paused = true)]
async fn one_trial_at_a_time_with_waits_that_grow_to_the_cap() {
    let flow = std::sync::Arc::new(Flow::new(&config(0.0)));
    let stop = CancellationToken::new();
    assert!(flow.refuse_events());
    // Five held messages wait at the gate; each trial that fails lets the next go.
    let trials = std::sync::Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let (flow, stop, trials) = (flow.clone(), stop.clone(), trials.clone());
        waiting.push(tokio::spawn(async move {
            loop {
                let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
                if !p.is_trial() {
                    flow.succeeded(p);
                    return;
                }
                let n = {
                    let mut t = trials.lock().unwrap();
                    t.push(Instant::now());
                    t.len()
                };
                // Crisp answers the trial after 10 ms.
                tokio::time::sleep(Duration::from_millis(10)).await;
                if n < 9 {
                    assert!(!flow.refused(p), "already refused");
                } else {
                    flow.succeeded(p);
                    return;
                }
            }
        }));
    }
    for w in waiting {
        w.await.unwrap();
    }
    let at = trials.lock().unwrap().clone();
    assert_eq!(at.len(), 9);
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        // Trial n waits between half of and the whole 500 ms * 2^n (cap 30 s), after
        // the 10 ms answer: never two at once, never in a tight loop.
        let ceiling = (Duration::from_millis(500) * 2u32.pow(i as u32 + 1)).min(TRIAL_MAX);
        assert!(
            *gap >= ceiling / 2 && *gap <= ceiling + Duration::from_millis(10),
            "gap {i}: {gap:?} (ceiling {ceiling:?})"
        );
    }
    assert!(gaps[7] >= TRIAL_MAX / 2, "grew to the cap: {gaps:?}");
    assert!(flow.state().is_sending());
}

#[tokio::test(start_paused = true)]
async fn a_hold_soon_after_the_last_goes_on_from_its_wait() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    assert!(flow.refuse_events());
    for _ in 0..4 {
        let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
        assert!(p.is_trial());
        flow.refused(p);
    }
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    flow.succeeded(p);
    // Refused again at once: the first trial waits as long as the fifth would have.
    assert!(flow.refuse_events());
    let start = Instant::now();
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(p.is_trial());
    assert!(
        start.elapsed() >= Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn waiting_at_the_gate_ends_at_the_hand_back_time() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    assert!(flow.refuse_events());
    let start = Instant::now();
    let budget = flow.budget(start + Duration::from_millis(200));
    assert!(flow.permit(&budget, &stop).await.is_err());
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    // A trial taken by a message that then stops is let go, not lost.
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(p.is_trial());
    drop(p);
    stop.cancel();
    assert!(flow.permit(&flow.budget(far()), &stop).await.is_err());
    let stop = CancellationToken::new();
    let p = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(p.is_trial(), "the trial is still offered");
}

#[tokio::test(start_paused = true)]
async fn failing_alone_while_others_get_through_is_exhausted() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    let mut budget = flow.budget(far());
    let outcome = loop {
        let p = flow.permit(&budget, &stop).await.unwrap();
        match flow.failed(p, &mut budget, &error(Failure::Transient, None)) {
            Retry::After(d) => {
                let other = flow.permit(&flow.budget(far()), &stop).await.unwrap();
                flow.succeeded(other);
                tokio::time::sleep(d).await
            }
            other => break other,
        }
    };
    assert_eq!(outcome, Retry::Exhausted);
    assert!(flow.state().is_sending());
}

#[tokio::test(start_paused = true)]
async fn a_retry_past_the_hand_back_time_hands_back() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    let mut budget = flow.budget(Instant::now() + Duration::from_millis(50));
    let p = flow.permit(&budget, &stop).await.unwrap();
    let e = error(Failure::Transient, Some(Duration::from_secs(1)));
    assert_eq!(flow.failed(p, &mut budget, &e), Retry::HandBack);
}

#[tokio::test(start_paused = true)]
async fn blocked_dead_letters_stop_every_request() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    let block = flow.block_dead_letters();
    assert!(block.began());
    assert_eq!(flow.state(), FlowState::DeadLettersBlocked);
    let budget = flow.budget(Instant::now() + Duration::from_secs(5));
    assert!(
        flow.permit(&budget, &stop).await.is_err(),
        "no trial either"
    );
    assert!(flow.unblock_dead_letters());
    assert!(flow.permit(&flow.budget(far()), &stop).await.is_ok());
    drop(block);
    // The last blocked copy that stops waiting ends a block nobody else can lift.
    let (a, b) = (flow.block_dead_letters(), flow.block_dead_letters());
    assert!(a.began() && !b.began());
    drop(a);
    assert_eq!(flow.state(), FlowState::DeadLettersBlocked);
    drop(b);
    assert!(flow.state().is_sending());
}

#[tokio::test(start_paused = true)]
async fn a_late_trial_of_an_earlier_hold_counts_for_nothing() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    assert!(flow.refuse_events());
    let old_trial = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(old_trial.is_trial());
    // A request sent before the hold got through: the hold ends; another begins.
    flow.reopen_for_test();
    assert!(flow.refuse_events());
    let trial = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(trial.is_trial());
    // The first hold's trial fails late: the second's trial is still out, alone.
    drop(old_trial);
    let waiting = flow.budget(Instant::now() + Duration::from_secs(40));
    assert!(
        flow.permit(&waiting, &stop).await.is_err(),
        "a second trial went out while one was"
    );
    drop(trial);
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_only_on_its_own_route() {
    let flow = Flow::new(&config(0.0));
    let stop = CancellationToken::new();
    let p = flow
        .permit(&flow.budget(far()), &stop)
        .await
        .unwrap()
        .for_route(CrispRoute::Profiles);
    assert!(flow.refused(p));
    // An event answered as a trial: the hold goes on, and the trial passes on at once.
    let t = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(t.is_trial());
    let at = Instant::now();
    flow.answered(t);
    assert_eq!(flow.state(), FlowState::Refused);
    let t = flow.permit(&flow.budget(far()), &stop).await.unwrap();
    assert!(t.is_trial());
    assert_eq!(Instant::now(), at, "the turn passed on without a wait");
    flow.succeeded(t.for_route(CrispRoute::Profiles));
    assert!(flow.state().is_sending());
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_ramps_up_instead_of_bursting() {
    let flow = Flow::new(&config(0.0));
    // Against a limit of 50 in any second, from the very first request: the slow
    // start finds it with a handful of refusals, not a burst of them.
    let (ok, refused) = run(&flow, Some(50), 10).await;
    assert!(
        refused <= 8,
        "{refused} refused of {} in the first 10 s",
        ok + refused
    );
    assert!(ok >= 430, "{ok} accepted in 10 s");
    eprintln!("cold start against 50/s: {ok} accepted, {refused} refused in 10 s");
    // Without a limit the ramp to this loop's 1,000/s takes under a second.
    let flow = Flow::new(&config(0.0));
    let (ok, _) = run(&flow, None, 2).await;
    assert!(ok > 1400, "{ok} of at most 2,000");
}
