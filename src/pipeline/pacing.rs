//! Pacing: when the next request to Crisp may start. The request rate learned from
//! Crisp's 429/420 answers (cut multiplicatively, grown back quickly far below the last
//! limit and slowly near it), under `max_requests_per_second`, and the pod-wide pause
//! Crisp asks for with `Retry-After`. Owned by the flow.

use crate::telemetry::metrics;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Fraction of the accepted rate kept after a 429/420: the accepted rate already is the
/// share Crisp gives us, so a small cut suffices and keeps the average near the limit.
const BETA: f64 = 0.98;
/// A 429 this long after a cut (and within a second of it) measures the share by what
/// was accepted since that cut: the last second may still hold a token bucket's burst.
const RECUT_SPAN: Duration = Duration::from_millis(250);
/// Growth near the last limit, as a fraction of it per second of saturated sending:
/// slow, since with N pods each cut removes only its own share of the excess...
const NEAR_GROWTH: f64 = 0.005;
/// ...and doubling per this long without a cut (at most 64-fold), so a share another pod
/// freed is taken within seconds.
const NEAR_SPEEDUP: Duration = Duration::from_secs(10);
/// Far below the last limit the rate doubles per second of saturated sending, and
/// beyond it triples, so a lifted limit is found again within seconds.
const FAR_BELOW: f64 = 0.8;
const FAR_ABOVE: f64 = 1.03;
const BELOW_GROWTH: f64 = 2.0;
const ABOVE_GROWTH: f64 = 3.0;
/// Beyond this multiple of the last limit the learned rate is forgotten.
const FORGET_ABOVE: f64 = 64.0;
/// Before Crisp first limits us, the rate starts here and grows by [`SLOW_START_GROWTH`]
/// per round trip of saturated sending, as TCP's slow start grows per acknowledgement:
/// a pod started cold on a backlog, or joining pods already at Crisp's limit, does not
/// open with a burst that Crisp answers with a storm of 429s, and what it sends in the
/// round trip before the first 429 reaches it (the refusals it cannot avoid) is a small
/// share of the limit. A Crisp answering in a millisecond is unpaced after a few answers.
pub(super) const SLOW_START_RATE: f64 = 10.0;
/// Growth per round trip in the slow start, as a fraction of the rate: the refusals of the
/// round trip before the first 429 are about `g / (1 + g)` of what the limit admits at
/// once (a token bucket's burst), so a doubling (g = 1) costs half of it.
const SLOW_START_GROWTH: f64 = 0.18;
/// The fastest the slow start grows, whatever the round trip: from 10/s to unpaced in a
/// quarter of a second of saturated sending.
const SLOW_START_DOUBLING: Duration = Duration::from_millis(25);
/// Round trips shorter than this count as this long.
const SLOW_START_MIN_RTT: Duration = Duration::from_millis(1);
/// A slow start that gets this far without a 429 ends: no pacing at all (only the
/// concurrency limit), as before any limit is known.
const SLOW_START_EXIT: f64 = 10_000.0;
/// The first and the longest wait between two probes of a closed window (never longer
/// than `delivery.max_backoff`, the longest a message waits between its own tries).
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(4);
/// After a closed window reopened, this many of its cycles pass before the rate may grow
/// fast again (to find a lifted limit; a window still there closes again then).
const STEADY_CYCLES: u32 = 3;
/// A closed window's cycle is taken for a rate limit's window (and its average kept)
/// when it is at most this long and let at least this many through.
const WINDOW_CYCLE_MAX: Duration = Duration::from_secs(300);
const WINDOW_ALLOWANCE_MIN: u64 = 20;
/// ...and when it stayed closed this long: one that reopens sooner is a window of a second
/// (or pods sharing a sliding one), whose rate the cut already learned; growing only slowly
/// for three cycles there would slow finding a lifted limit, so the learned rate resumes.
const WINDOW_CLOSED_MIN: Duration = Duration::from_secs(1);
/// Never slower than this (a rate of zero would stop the pod for good).
const MIN_RATE: f64 = 0.5;
/// The longest stretch of time one claim counts as growth (after an idle spell the
/// first request must not jump the rate).
const MAX_GROWTH_STEP: Duration = Duration::from_millis(250);
/// The window the sent and accepted rates are measured over.
pub(super) const WINDOW: Duration = Duration::from_secs(1);

/// Events of the last [`WINDOW`], to measure a rate.
#[derive(Debug, Default)]
pub(super) struct Window(VecDeque<Instant>);

impl Window {
    pub(super) fn push(&mut self, now: Instant) {
        self.trim(now);
        self.0.push_back(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.0.pop_front();
        }
    }

    /// Forgets one event at `at` (a request Crisp refused: limiters count what they admit).
    fn forget(&mut self, at: Instant) {
        if let Ok(i) = self.0.binary_search(&at) {
            self.0.remove(i);
        }
    }

    /// Events after `t`.
    fn after(&self, t: Instant) -> usize {
        self.0.iter().rev().take_while(|&&at| at > t).count()
    }

    fn per_second(&mut self, now: Instant) -> f64 {
        self.trim(now);
        self.0.len() as f64 / WINDOW.as_secs_f64()
    }

    /// When one more event keeps the last [`WINDOW`] at `most` events: now, or when
    /// enough of them have aged out.
    fn room_at(&mut self, now: Instant, most: usize) -> Instant {
        self.trim(now);
        let most = most.max(1);
        match self.0.len().checked_sub(most) {
            Some(over) => self.0[over] + WINDOW,
            None => now,
        }
    }
}

/// The pacing state: when the next request may start.
#[derive(Debug)]
pub(super) struct Pacing {
    /// `max_requests_per_second`: a hard ceiling.
    ceiling: Option<f64>,
    /// The rate learned from 429/420 (or growing in the slow start); `None`: unpaced.
    pub(super) learned: Option<f64>,
    /// No 429/420 seen yet: `learned` is the slow start's rate.
    slow_start: bool,
    /// The accepted rate when Crisp last limited us: the limit's estimate.
    last_limit: f64,
    last_cut: Option<Instant>,
    last_claim: Instant,
    /// When the slow start last heard an accepted answer.
    last_answer: Instant,
    next_slot: Instant,
    /// Crisp's `Retry-After`, for every request of the pod.
    pub(super) paused_until: Instant,
    sent: Window,
    /// What was sent and not refused (accepted, or still unanswered): what a limiter
    /// that counts the requests it admits holds of ours.
    admitted: Window,
    accepted: Window,
    /// Refusals while nothing was accepted for a second (a window closed until it
    /// resets, or a spent quota): one probe request at a time.
    probing: Option<Probing>,
    /// PROBE_FIRST and PROBE_MAX, under `max_backoff`.
    probe_first: Duration,
    probe_max: Duration,
    /// Requests accepted so far, and where the last closed window's cycle began (the
    /// pacing's start, or the end of the last probing): a window that closes and reopens
    /// allows on average what was accepted over one such cycle.
    accepted_total: u64,
    cycle_from: (Instant, u64),
    /// For [`STEADY_CYCLES`] cycles after a window reopened, the rate grows only slowly:
    /// no 429 comes until the allowance is spent, which says nothing about a lifted limit.
    steady_until: Option<Instant>,
    /// A request sent after the last cut was accepted (so the limiter still lets some
    /// through).
    accepted_since_cut: bool,
}

#[derive(Debug, Clone, Copy)]
struct Probing {
    /// Between two probes.
    every: Duration,
    /// Answers to requests sent before this are not answers to a probe.
    since: Instant,
    /// When the probing began: how long the window stayed closed.
    began: Instant,
}

impl Pacing {
    pub(super) fn new(max_requests_per_second: f64, max_backoff: Duration) -> Self {
        let now = Instant::now();
        Self {
            ceiling: (max_requests_per_second > 0.0).then_some(max_requests_per_second),
            learned: Some(SLOW_START_RATE),
            slow_start: true,
            last_limit: 0.0,
            last_cut: None,
            last_claim: now,
            last_answer: now,
            next_slot: now,
            paused_until: now,
            sent: Window::default(),
            admitted: Window::default(),
            accepted: Window::default(),
            probing: None,
            probe_first: PROBE_FIRST.min(max_backoff),
            probe_max: PROBE_MAX.min(max_backoff),
            accepted_total: 0,
            cycle_from: (now, 0),
            steady_until: None,
            accepted_since_cut: false,
        }
    }

    /// Crisp cut the rate within the last second (so the last second's sends may be
    /// over the new rate).
    fn cut_lately(&self) -> bool {
        self.last_cut
            .is_some_and(|cut| cut.elapsed() < WINDOW + WINDOW)
    }

    /// Paced by what Crisp taught us (not by the slow start, nor by nothing).
    pub(super) fn throttled(&self) -> bool {
        self.learned.is_some() && !self.slow_start
    }

    pub(super) fn rate(&self) -> Option<f64> {
        match (self.ceiling, self.learned) {
            (Some(c), Some(l)) => Some(c.min(l)),
            (c, l) => c.or(l),
        }
    }

    /// Takes the turn if it has come; else says when to look again.
    pub(super) fn claim(&mut self, now: Instant, waited: bool) -> Result<Instant, Instant> {
        let learned = self.learned.is_some();
        let claimed = self.claim_turn(now, waited);
        if learned && self.learned.is_none() {
            metrics::request_rate_limit(0.0);
        }
        claimed
    }

    fn claim_turn(&mut self, now: Instant, waited: bool) -> Result<Instant, Instant> {
        let mut turn = self.next_slot.max(self.paused_until);
        if let (Some(rate), true) = (self.rate(), self.cut_lately()) {
            // Right after a cut the last second still holds what was admitted at the old
            // rate: a limiter counting that second refuses until it ages out, so new
            // requests stop at once instead of meeting a second of refusals.
            turn = turn.max(self.admitted.room_at(now, rate.floor() as usize));
        }
        if turn > now {
            return Err(turn);
        }
        self.next_slot = if let Some(probing) = self.probing {
            // One probe per interval; an accepted one ends the probing.
            now + probing.every
        } else {
            if waited {
                // Only time spent sending as fast as allowed says the rate could be
                // higher. At a low rate one claim stands for a long stretch of saturated
                // sending.
                let longest = self.rate().map_or(MAX_GROWTH_STEP, |r| {
                    MAX_GROWTH_STEP.max(Duration::from_secs_f64(2.0 / r))
                });
                let step = now.duration_since(self.last_claim).min(longest);
                self.grow(step.as_secs_f64());
            }
            match self.rate() {
                Some(rate) => {
                    let interval = Duration::from_secs_f64(1.0 / rate);
                    // Spaced from the turn, not from the (late) wake-up, so timer slack
                    // does not eat the rate; after an idle spell no credit is banked.
                    let from = if now.duration_since(turn) < interval {
                        turn
                    } else {
                        now
                    };
                    from + interval
                }
                None => now,
            }
        };
        self.last_claim = now;
        self.sent.push(now);
        self.admitted.push(now);
        Ok(now)
    }

    /// Crisp accepted a request sent at `sent_at`.
    pub(super) fn accepted(&mut self, sent_at: Instant, now: Instant) {
        self.accepted.push(now);
        self.accepted_total += 1;
        if self.last_cut.is_some_and(|cut| sent_at >= cut) {
            self.accepted_since_cut = true;
        }
        if self.probing.is_some_and(|p| sent_at >= p.since) {
            self.window_reopened(now);
        }
        let Some(rate) = self.learned.filter(|_| self.slow_start) else {
            return;
        };
        let rtt = now.duration_since(sent_at).max(SLOW_START_MIN_RTT);
        // The time since the last answer, as long as answers came at about the paced
        // rate (an idle spell is not saturated sending), in round trips.
        let since = now
            .duration_since(self.last_answer)
            .min(Duration::from_secs_f64(2.0 / rate));
        self.last_answer = now;
        let round_trips = since.as_secs_f64() / rtt.as_secs_f64();
        // And at most a doubling per [`SLOW_START_DOUBLING`]: against a Crisp answering at
        // once the round trips alone would reach thousands a second before a limiter's
        // burst is spent, and every concurrency slot would meet its first 429 together.
        let doublings = since.as_secs_f64() / SLOW_START_DOUBLING.as_secs_f64();
        let grown = rate
            * (1.0 + SLOW_START_GROWTH)
                .powf(round_trips)
                .min(2f64.powf(doublings))
                .min(2.0);
        if grown > SLOW_START_EXIT {
            self.learned = None;
            self.slow_start = false;
            metrics::request_rate_limit(0.0);
        } else {
            self.learned = Some(self.ceiling.map_or(grown, |c| grown.min(c)));
        }
    }

    /// A probe was accepted: the closed window reopened. Sending at the learned rate
    /// would spend a window's allowance at once and close it again for most of its
    /// length; the average accepted over the last cycle (open and closed) spreads it
    /// instead. Only for what looks like a window: a cycle of at most
    /// [`WINDOW_CYCLE_MAX`] that let at least [`WINDOW_ALLOWANCE_MIN`] through. A storm
    /// of 429s or a daily quota's reset resumes the learned rate (and regrows from it).
    fn window_reopened(&mut self, now: Instant) {
        let closed_for = self
            .probing
            .take()
            .map_or(Duration::ZERO, |p| now.duration_since(p.began));
        self.next_slot = now;
        let (from, total) = self.cycle_from;
        self.cycle_from = (now, self.accepted_total);
        let cycle = now.duration_since(from);
        let allowance = self.accepted_total - total;
        if cycle > WINDOW_CYCLE_MAX
            || closed_for < WINDOW_CLOSED_MIN
            || allowance < WINDOW_ALLOWANCE_MIN
        {
            return;
        }
        // The probing began within the cycle, so the cycle is at least `closed_for` long.
        let average = allowance as f64 / cycle.as_secs_f64();
        let rate = (average * BETA).max(MIN_RATE);
        // A learned rate below the average is the better estimate of the limit (a
        // cycle of a second or so holds the cut's own round trip): growth starts from it,
        // not fast towards an average it never reached.
        let rate = self.learned.map_or(rate, |l| l.min(rate));
        self.learned = Some(rate);
        self.last_limit = (rate / BETA).max(MIN_RATE);
        // Counts as a cut: growth starts slow again, and older refusals are moot.
        self.last_cut = Some(now);
        self.accepted_since_cut = false;
        self.steady_until = Some(now + cycle * STEADY_CYCLES);
    }

    fn grow(&mut self, secs: f64) {
        let Some(rate) = self.learned else { return };
        if self.slow_start {
            // It grows with the answers (`accepted`), not with time.
            return;
        }
        let limit = self.last_limit;
        let steady = self.steady_until.is_some_and(|t| Instant::now() < t);
        let grown = if rate < FAR_BELOW * limit {
            rate * BELOW_GROWTH.powf(secs)
        } else if steady {
            rate + NEAR_GROWTH * limit * secs
        } else if rate > FAR_ABOVE * limit {
            rate * ABOVE_GROWTH.powf(secs)
        } else {
            // Slow right after a cut, faster the longer none comes: a share freed by a
            // pod that left (or a limit raised a little) is taken within seconds.
            let calm = self.last_cut.map_or(0.0, |cut| cut.elapsed().as_secs_f64());
            let speedup = 2f64.powf(calm / NEAR_SPEEDUP.as_secs_f64()).min(64.0);
            rate + NEAR_GROWTH * speedup * limit * secs
        };
        self.learned = if grown > FORGET_ABOVE * limit {
            None
        } else {
            // Above the ceiling growth means nothing: stay at it, ready to be cut from it.
            Some(self.ceiling.map_or(grown, |c| grown.min(c)))
        };
    }

    /// Crisp said "too many" to a request sent at `sent_at`; true when the rate changed.
    pub(super) fn cut(&mut self, sent_at: Instant, now: Instant) -> bool {
        self.admitted.forget(sent_at);
        if self.last_cut.is_some_and(|cut| sent_at < cut) {
            // Sent before the last cut: that cut already answered this excess. A request
            // sent after it went out only once the last second had room for the new rate
            // (`claim_turn`), so its refusal says the new rate is still too high.
            return false;
        }
        let mut accepted = self.accepted.per_second(now);
        let recent_cut = self.last_cut.filter(|&cut| {
            let since = now.duration_since(cut);
            since >= RECUT_SPAN && since < WINDOW
        });
        if let Some(cut) = recent_cut {
            // Refused again soon after a cut: what was accepted since is the share now
            // (the last second still holds a token bucket's burst, spent before the cut).
            accepted = self.accepted.after(cut) as f64 / now.duration_since(cut).as_secs_f64();
        }
        // A request sent after the last cut went out only once the last second had room
        // for the new rate; refused, with nothing sent since the cut accepted, it says
        // the limiter lets nothing through at any rate (before, a second of cuts went
        // into a closed minute window: 7.6 % of a run's requests refused in the model).
        let dry = self.last_cut.is_some() && !self.accepted_since_cut;
        if (accepted == 0.0 || dry) && self.learned.is_some() && !self.slow_start {
            // Nothing got through for a second at a rate that got through before: a
            // window closed until it resets (a per-minute limit) or a spent quota.
            // Slowing down finds no share; one probe at a time finds the reopening,
            // at waits that double up to `probe_max`, instead of every waiting message
            // retrying into it (each message's backoff and the hold still apply).
            let probing = match self.probing {
                None => Probing {
                    every: self.probe_first,
                    since: now,
                    began: now,
                },
                // Only a refused probe doubles the wait, not what was in flight.
                Some(p) if sent_at >= p.since => Probing {
                    every: (p.every * 2).min(self.probe_max),
                    since: now,
                    began: p.began,
                },
                Some(p) => p,
            };
            self.probing = Some(probing);
            self.next_slot = self.next_slot.max(now + probing.every);
            return false;
        }
        self.probing = None;
        let sending = self.sent.per_second(now).max(MIN_RATE);
        let current = self.rate().map_or(sending, |r| r.min(sending));
        // What Crisp let through is the share it gives us. Near the last limit a stall
        // (a slow second on our side) must not pass for a smaller share: cut at most
        // by a tenth there; far above it, at most by half.
        let floor = if recent_cut.is_some() {
            current / 2.0
        } else if current <= FAR_ABOVE * self.last_limit {
            current * 0.9
        } else {
            current / 2.0
        };
        let base = accepted.max(floor).min(current);
        // With nothing accepted the answer says nothing about the limit (everything is
        // refused): keep the old estimate, so recovery ramps fast up to it.
        if accepted > 0.0 || self.last_limit < MIN_RATE {
            self.last_limit = base.max(MIN_RATE);
        }
        self.learned = Some((base * BETA).max(MIN_RATE));
        if self.slow_start {
            // The first closed window's cycle counts from here: with the slow start's
            // ramp in it, its average is below any limit's.
            self.cycle_from.0 = now;
        }
        self.slow_start = false;
        self.last_cut = Some(now);
        self.accepted_since_cut = false;
        // The lower rate applies to the very next request.
        if let Some(rate) = self.rate() {
            self.next_slot = self
                .next_slot
                .max(now + Duration::from_secs_f64(1.0 / rate));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slow_start_grows_by_a_fixed_share_per_round_trip() {
        let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
        let t0 = pacing.last_answer;
        let ms = Duration::from_millis;
        let g = 1.0 + SLOW_START_GROWTH;
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
        // 100 ms round trips, answers 100 ms apart (the paced rate, 10/s): g each.
        pacing.accepted(t0, t0 + ms(100));
        assert!(close(pacing.rate(), 10.0 * g));
        pacing.accepted(t0 + ms(100), t0 + ms(200));
        assert!(close(pacing.rate(), 10.0 * g * g));
        // Answers closer together count for their share of a round trip.
        pacing.accepted(t0 + ms(150), t0 + ms(250));
        let expected = 10.0 * g * g * g.powf(0.5);
        assert!(close(pacing.rate(), expected));
        // An idle spell counts as two paced intervals at most.
        pacing.accepted(t0 + ms(60_000), t0 + ms(60_100));
        let expected = expected * g.powf(2.0 / expected / 0.1);
        assert!((pacing.rate().unwrap() - expected).abs() < 1e-6);
        // A Crisp answering at once: a doubling per 25 ms of saturated sending at most,
        // however short the round trip, so unpaced after about a third of a second.
        let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
        let start = pacing.last_answer;
        let mut at = start;
        while let Some(rate) = pacing.rate() {
            at += Duration::from_secs_f64(1.0 / rate);
            pacing.accepted(at, at);
            assert!(
                pacing.rate().is_none_or(|r| r <= 2.0 * rate),
                "at most a doubling"
            );
        }
        let ramp = at.duration_since(start);
        assert!(ramp >= ms(250) && ramp <= ms(450), "unpaced after {ramp:?}");
        assert!(!pacing.throttled());
    }

    #[test]
    fn the_slow_start_stays_under_the_ceiling_and_ends_at_the_first_cut() {
        let mut pacing = Pacing::new(25.0, Duration::from_secs(60));
        let t0 = pacing.last_answer;
        let ms = Duration::from_millis;
        for n in 1..=20 {
            pacing.accepted(t0 + ms(100 * n - 100), t0 + ms(100 * n));
        }
        assert_eq!(pacing.rate(), Some(25.0));
        let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
        pacing.accepted(t0, t0 + ms(100));
        assert!(pacing.cut(t0, t0 + Duration::from_millis(1)));
        let after_cut = pacing.rate();
        pacing.accepted(t0, t0 + Duration::from_millis(2));
        assert_eq!(
            pacing.rate(),
            after_cut,
            "answers no longer grow a learned rate"
        );
    }

    /// A pacing throttled at `rate` (as after a cut), with a second of answers accepted
    /// at that rate behind it; returns the instant after that second.
    fn throttled_at(pacing: &mut Pacing, rate: f64, t0: Instant) -> Instant {
        pacing.learned = Some(rate);
        pacing.slow_start = false;
        pacing.last_limit = rate;
        let step = Duration::from_secs_f64(1.0 / rate);
        let mut at = t0;
        while at < t0 + WINDOW {
            pacing.sent.push(at);
            pacing.admitted.push(at);
            pacing.accepted.push(at);
            at += step;
        }
        at
    }

    #[test]
    fn a_window_closed_for_a_second_is_probed_one_request_at_a_time() {
        let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
        let t0 = pacing.last_answer;
        let ms = Duration::from_millis;
        let mut now = throttled_at(&mut pacing, 50.0, t0);
        // The window closes: a second with nothing accepted, then a refusal.
        now += WINDOW;
        assert!(!pacing.cut(now - ms(1), now), "no cut: no share to find");
        assert_eq!(pacing.rate(), Some(50.0), "the learned rate is kept");
        assert_eq!(pacing.claim(now, false), Err(now + PROBE_FIRST));
        now += PROBE_FIRST;
        assert_eq!(pacing.claim(now, true), Ok(now), "the first probe");
        assert!(pacing.claim(now + ms(10), true).is_err(), "one at a time");
        // Refused probes wait twice as long each time, up to PROBE_MAX; refusals of
        // requests sent before the probing began do not count.
        let mut waits = Vec::new();
        for _ in 0..6 {
            pacing.cut(now - ms(500), now + ms(1));
            pacing.cut(now, now + ms(1));
            let next = pacing.claim(now + ms(1), true).unwrap_err();
            waits.push(next.duration_since(now + ms(1)));
            now = next;
            assert_eq!(pacing.claim(now, true), Ok(now));
        }
        assert_eq!(
            waits,
            [ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(4000)]
        );
        // A probe accepted: the window reopened. The rate is what the whole cycle
        // (open and closed) accepted on average, so the next allowance lasts.
        pacing.accepted_total = 600; // accepted since the pacing began, at t0
        pacing.accepted(now, now + ms(1));
        now += ms(1);
        assert!(pacing.probing.is_none());
        let average = 601.0 / now.duration_since(t0).as_secs_f64();
        let rate = pacing.rate().unwrap();
        assert!((rate - average * BETA).abs() < 1e-6, "{rate} for {average}");
        assert!(rate > 10.0 && rate < 50.0);
        assert_eq!(pacing.claim(now, true), Ok(now));
        // No probe interval any more: the next request waits for its paced turn only.
        let turn = pacing.claim(now, true).unwrap_err();
        assert!(turn <= now + Duration::from_secs_f64(1.0 / rate) + ms(1));
    }

    #[test]
    fn a_refusal_after_a_cut_with_nothing_since_accepted_starts_probing() {
        let ms = Duration::from_millis;
        for accepted_since in [false, true] {
            let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
            let t0 = pacing.last_answer;
            let now = throttled_at(&mut pacing, 50.0, t0);
            assert!(pacing.cut(now - ms(1), now), "the first refusal cuts");
            let rate = pacing.rate().unwrap();
            if accepted_since {
                pacing.accepted(now + ms(20), now + ms(120));
            }
            // A request sent after the cut, refused 150 ms later.
            let cut_again = pacing.cut(now + ms(50), now + ms(150));
            if accepted_since {
                assert!(
                    cut_again,
                    "some still get through: a lower rate finds the share"
                );
                assert!(pacing.probing.is_none());
            } else {
                assert!(!cut_again, "nothing gets through: no rate finds a share");
                assert!(pacing.probing.is_some(), "one probe at a time");
                assert_eq!(pacing.rate(), Some(rate), "the learned rate is kept");
                assert_eq!(
                    pacing.claim(now + ms(150), true),
                    Err(now + ms(150) + PROBE_FIRST)
                );
            }
        }
    }

    #[test]
    fn probes_never_wait_longer_than_max_backoff() {
        let mut pacing = Pacing::new(0.0, Duration::from_millis(200));
        let t0 = pacing.last_answer;
        let mut now = throttled_at(&mut pacing, 50.0, t0) + WINDOW;
        pacing.cut(now - Duration::from_millis(1), now);
        for _ in 0..4 {
            let next = pacing.claim(now, true).unwrap_err();
            assert!(next.duration_since(now) <= Duration::from_millis(200));
            now = next;
            assert_eq!(pacing.claim(now, true), Ok(now));
            pacing.cut(now, now);
        }
        // A storm of 429s, not a window with an allowance: the learned rate resumes.
        pacing.accepted(now, now);
        assert!(pacing.probing.is_none());
        assert_eq!(pacing.rate(), Some(50.0));
    }

    #[test]
    fn a_refusal_soon_after_a_cut_measures_the_share_since_it() {
        let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
        let t0 = pacing.last_answer;
        let ms = Duration::from_millis;
        // A token bucket's burst: 100 accepted in the last second, but its rate is 40/s.
        let now = throttled_at(&mut pacing, 100.0, t0);
        assert!(pacing.cut(now - ms(1), now));
        let rate = pacing.rate().unwrap();
        assert!(
            rate > 95.0 && rate <= 100.0 * BETA,
            "{rate}: the last second's"
        );
        // 400 ms later, 16 accepted since the cut (40/s) and a request sent after the cut
        // refused: cut to the share since the cut, not by a tenth of the last second's.
        for i in 1..=16 {
            pacing.accepted(now + ms(25 * i - 20), now + ms(25 * i));
        }
        let later = now + ms(400);
        assert!(pacing.cut(now + ms(100), later));
        let rate = pacing.rate().unwrap();
        assert!((rate - 40.0 * BETA).abs() < 1e-9, "{rate}");
        // Refused requests do not fill the room the next request waits for: a limiter
        // counts what it admits.
        let mut pacing = Pacing::new(0.0, Duration::from_secs(60));
        let now = throttled_at(&mut pacing, 10.0, t0);
        for i in 0..10 {
            let at = now + ms(i);
            pacing.sent.push(at);
            pacing.admitted.push(at);
            pacing.cut(at, at + ms(1));
        }
        assert_eq!(pacing.admitted.after(now - ms(1)), 0);
        assert_eq!(pacing.sent.after(now - ms(1)), 10);
    }
}
