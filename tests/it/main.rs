//! Integration tests: real servers on port 0, real HTTP receivers.

mod support;

mod api;
mod auth;
mod chaos;
mod cli;
mod correctness;
mod crash;
mod delivery;
mod disk;
mod documented;
mod dynamodb;
mod faults;
mod grpcurl;
mod observability;
mod operate;
mod security;
mod status_page;
mod store_conformance;
mod subscriptions;
mod tls;
