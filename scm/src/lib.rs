//! The SCM hub as a library: configuration, state, the agent link, operator sessions and
//! configuration pushes. `main.rs` parses the command line and calls into it; integration
//! tests run the real binary.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agents;
pub mod auth;
pub mod command;
pub mod config;
pub mod events;
pub mod fleet;
pub mod generic;
pub mod hub;
pub mod initdev;
pub mod metrics;
pub mod operator;
pub mod push;
pub mod retry;
pub mod rfideas;
pub mod server;
pub mod store;
pub mod swipes;
pub mod tlsreload;
