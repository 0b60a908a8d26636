//! The delivery engine: partition scheduling ([`worker`]), the HTTP attempt and its signature
//! ([`webhook`]), and the backoff schedule ([`retry`]).

pub mod lease;
mod partition;
pub mod retry;
pub mod webhook;
pub mod worker;

pub use worker::{Engine, EngineConfig};
