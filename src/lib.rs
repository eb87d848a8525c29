//! crisp-bridge consumes domain events from RabbitMQ and adds them to Crisp profiles as
//! people events, acknowledging each message only after Crisp accepted it.
//!
//! ```text
//!  broker ──▶ decode ──▶ route ──▶ map ──▶ deliver ──▶ settle
//!  (lapin)    (JSON)     (rules)   (event)  (Crisp)     (ack | dead-letter | requeue)
//! ```
//!
//! | step | module |
//! |---|---|
//! | 1 consume: connect, topology, prefetch | [`broker`] |
//! | 2 bytes (and CloudEvents headers) -> JSON object | [`decode`] |
//! | 3-4 first matching rule -> Crisp event | [`route`] (pure, compiled at start-up) |
//! | 2-4 as one path, for `run` and the offline commands | [`pipeline::triage`] |
//! | 5 Crisp client: auth, encoding, classification | [`crisp`] |
//! | 6 ack / dead-letter / requeue | [`broker::settle`]; acks batched per channel by [`broker::acks`] |
//! | what happened -> disposition (one pure function) | [`pipeline::fate`] |
//! | per-person order, the flow to Crisp (pacing, holds, trials), retries | [`pipeline`] |
//!
//! Around them: [`contract`] (offline evaluation for `map` and `test`), [`cli`] (the
//! commands), [`config`] (figment layering, validation, secrets and their redaction),
//! [`app`] (wiring, ordered and bounded shutdown), [`admin`] (`/healthz` `/readyz`
//! `/metrics` `/tap`), [`telemetry`] (logs, metric names, the tap), [`replay`] (moving dead letters
//! back), [`sandbox`] (a local Crisp for trying rules and for tests), and [`outcome`]
//! (reason codes and dispositions shared by every step). The contract these modules keep
//! is `docs/contract.md`; what they assume of Crisp, `docs/crisp-api.md`.

pub mod admin;
pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod contract;
pub mod crisp;
pub mod decode;
pub mod outcome;
pub mod pipeline;
pub mod replay;
pub mod route;
pub mod sandbox;
pub mod telemetry;
