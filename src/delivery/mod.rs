//! The delivery engine: partition scheduling ([`worker`]), the HTTP attempt and its signature
//! ([`webhook`]), the backoff schedule ([`retry`]), per-subscription pacing ([`pacing`]),
//! and which addresses it may reach ([`endpoint_policy`]).

pub mod endpoint_policy;
pub mod lease;
pub mod pacing;
mod partition;
pub mod retry;
#[cfg(test)]
mod scheduling_tests;
pub mod webhook;
pub mod worker;

pub use worker::{Engine, EngineConfig};
