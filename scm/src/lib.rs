//! The SCM hub as a library. `main.rs` parses the command line and calls into [`app`];
//! end-to-end tests run the real binary, and the fuzz targets drive the parsers through
//! [`fuzzing`]. Everything else is `pub(crate)`. The module map and the rules for where new code
//! goes are in `ARCHITECTURE.md` at the repository root.
//!
//! Layers, imports pointing down only:
//! - [`app`]: configuration assembly, wiring, `init-dev` (imported by nothing);
//! - [`front`]: the telnet console, the gRPC admin API, metrics: parse, authorise, render;
//! - [`ops`]: the use cases (push, fleet push, rollback, retries, audit, swipes, logins);
//! - [`link`], [`bridges`], [`state`], [`coord`]: the agent link, the print-server bridges,
//!   the durable state and the in-process coordinators.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod app;
pub(crate) mod bridges;
pub mod cli;
pub(crate) mod coord;
pub(crate) mod front;
pub mod fuzzing;
pub(crate) mod link;
pub(crate) mod metrics;
pub(crate) mod ops;
pub(crate) mod state;
pub(crate) mod tlsreload;
