//! Herald: a gRPC event broker that delivers every event to every matching webhook
//! subscription, in publish order per (topic, subscription), with retries, and never loses an
//! event it has acknowledged.
//!
//! # Layout
//! - [`config`]: `herald serve` settings (flags and `HERALD_*` variables) and every default.
//! - [`app`]: composition root; [`app::run`] serves on a given listener until shutdown.
//! - [`shutdown`]: the OS-signal future and the handle passed to background tasks.
//! - [`tls`]: TLS and mTLS on the gRPC listener, reloaded when the files change.
//! - [`trace`]: W3C trace context carried from Publish to every delivery attempt;
//!   [`telemetry`]: log output and the optional OTLP export of Herald's spans.
//! - [`api`]: the gRPC adapter over [`broker`]; [`auth`]: API keys and what each may call.
//! - [`broker`]: the operations (publish, subscribe, ...), validated by [`validate`].
//! - [`model`]: domain types; [`rate`]: per-key rate limits; [`filter`]: subscription filters
//!   (CEL expressions over an event's topic and attributes).
//! - [`metrics`]: Prometheus metrics and their `/metrics` listener; [`admin`]: the admin
//!   listener (status page and metrics); [`backlog`]: the per-subscription backlog gauges.
//! - [`store`]: the storage contract, split by job (subscriptions, delivery log, leases), and
//!   its backends.
//! - [`delivery`]: partition workers, HTTP signing and sending, backoff.
//! - [`error`]: the crate error and its mapping to gRPC status codes.
//! - [`ids`]: resource ids that sort in creation order.
//! - [`signing`]: Standard Webhooks secrets and signatures.
//! - [`cli`]: the `herald` command-line client and test sink.
//! - [`proto`]: generated gRPC types of `proto/herald/v1/broker.proto`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod backlog;
pub mod broker;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod error;
pub mod filter;
pub mod ids;
pub mod metrics;
pub mod model;
pub mod rate;
pub mod shutdown;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod validate;

/// Generated types and client/server stubs of the `herald.v1` API.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("herald.v1");

    /// Encoded descriptor set of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/herald_descriptor.bin"));
}
