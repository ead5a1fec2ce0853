//! In-process coordinators: what the SCM's tasks agree on between them without the
//! database. Each sits behind a small interface, used through it by its callers, with
//! today's in-process implementation beside it, so that a shared implementation (several
//! SCMs in front of one fleet) can replace it later:
//!
//! - [`sessions`]: which link holds which machine ([`sessions::SessionRegistry`]);
//! - [`delivery`]: one delivery per machine at a time ([`delivery::DeliveryLocks`]);
//! - [`retry`]: waking the retry task ([`retry::RetryScheduler`]);
//! - [`dedup`]: recent swipe event ids ([`dedup::Dedup`]);
//! - [`events`]: the event bus for watchers ([`events::EventBus`]);
//! - [`throttle`]: failed operator logins per source ([`throttle::LoginThrottle`]);
//! - [`ids`]: link and request ids.

pub(crate) mod dedup;
pub(crate) mod delivery;
pub(crate) mod events;
pub(crate) mod ids;
pub(crate) mod retry;
pub(crate) mod sessions;
pub(crate) mod throttle;
