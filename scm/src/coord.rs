//! In-process coordinators: the event bus for watchers. Each sits behind a small
//! interface so that a shared implementation can replace it.

pub mod events;
