//! The use cases, written once for every front end: configuration pushes (one machine, a
//! fleet, rollback), their retries, the audit log, operator logins, and the path of a card
//! swipe from the agent link to the print-server bridges.

pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod fleet;
pub(crate) mod operator;
pub(crate) mod push;
pub(crate) mod retry;
pub(crate) mod swipes;
