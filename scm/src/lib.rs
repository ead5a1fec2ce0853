//! The SCM hub as a library. `main.rs` parses the command line and calls into [`app`];
//! end-to-end tests run the real binary. The module map and the rules for where new code
//! goes are in `ARCHITECTURE.md` at the repository root.
//!
//! Layers, imports pointing down only:
//! - [`app`]: configuration assembly, wiring, `init-dev` (imported by nothing);
//! - [`front`]: the telnet console, the gRPC admin API, metrics: parse, authorise, render;
//! - [`ops`]: the use cases (push, fleet push, rollback, retries, audit, swipes, logins);
//! - [`link`], [`bridges`], [`state`], [`coord`]: the agent link, the print-server bridges,
//!   the durable state and the in-process coordinators.
#![forbid(unsafe_code)]

pub mod app;
pub mod bridges;
pub mod coord;
pub mod front;
pub mod hub;
pub mod link;
pub mod metrics;
pub mod ops;
pub mod state;
pub mod tlsreload;
