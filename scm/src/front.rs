//! The front ends: the operator's telnet console, the gRPC admin API and the metrics
//! endpoint. They parse requests, authorise them and render the answers; the use cases
//! themselves live in [`crate::ops`].

pub(crate) mod admin;
pub(crate) mod metrics;
pub(crate) mod telnet;

#[cfg(test)]
mod tests;
