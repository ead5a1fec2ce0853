//! The use cases, written once for every front end: configuration pushes (one machine, a
//! fleet, rollback), their retries, the audit log, operator logins, and the path of a card
//! swipe from the agent link to the print-server bridges.

pub(crate) mod audit;
pub mod auth;
pub mod fleet;
pub(crate) mod operator;
pub mod push;
pub mod retry;
pub mod swipes;
