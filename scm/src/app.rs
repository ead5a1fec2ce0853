//! The application: assembles the configuration from each subsystem's settings, wires the
//! subsystems together and runs the listeners, and writes development fleets (`init-dev`).
//! Nothing else in the crate imports this module.

pub mod config;
pub mod initdev;
pub mod server;

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

/// For `scm hash-password`.
pub use crate::ops::auth::{HashError, hash_password};
