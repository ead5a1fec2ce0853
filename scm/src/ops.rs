//! The use cases, written once for every front end: configuration pushes (one machine, a
//! fleet, rollback), their retries, the audit log, operator logins, and the path of a card
//! swipe from the agent link to the print-server bridges.

pub mod auth;
pub mod fleet;
pub mod push;
pub mod retry;
pub mod swipes;
