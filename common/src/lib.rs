//! Plumbing shared by the three binaries: pre-bound listeners that announce themselves,
//! a capped accept loop with one task per connection, shutdown on signals, configuration
//! loading (TOML file plus environment overrides), logging set-up, secret masking, and the
//! metrics registry with its small HTTP server (`/metrics`, `/health`); and the small
//! helpers every crate would otherwise write again: the exponential back-off, the Unix-ms
//! clock, taking a lock whatever a panic left behind, and TLS reload on SIGHUP.
//!
//! Protocol, TLS and telnet code live in their own crates (`scm-proto`, `scm-certs`,
//! `scm-telnet`); this crate only holds what every server needs around them.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod card;
pub mod clock;
pub mod config;
pub mod failpoint;
pub mod http;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod secret;
pub mod serve;
pub mod shutdown;
pub mod text;

pub use secret::Secret;
pub use serve::{ServeOptions, bind, serve};
pub use shutdown::shutdown_on_signals;
