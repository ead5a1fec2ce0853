//! Plumbing shared by the three binaries: pre-bound listeners that announce themselves,
//! a capped accept loop with one task per connection, shutdown on signals, configuration
//! loading (TOML file plus environment overrides), logging set-up, secret masking, and the
//! metrics registry with its small HTTP server (`/metrics`, `/health`).
//!
//! Protocol, TLS and telnet code live in their own crates (`scm-proto`, `scm-certs`,
//! `scm-telnet`); this crate only holds what every server needs around them.
#![forbid(unsafe_code)]

pub mod card;
pub mod config;
pub mod failpoint;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod secret;
pub mod serve;
pub mod shutdown;

pub use secret::Secret;
pub use serve::{ServeOptions, bind, serve};
pub use shutdown::shutdown_on_signals;
