//! The print-server bridges: Generic (a TCP line per card, the print server connects in)
//! and RFIDeas 241 Client Mode (an HTTP/HTTPS request per swipe, configuration over HTTP).
//! Both sit behind [`Bridge`]: the swipe path routes a swipe to the bridges that have a
//! device for its machine and reader, and each bridge reports how every swipe it took
//! ended on its own outcome channel.

use std::fmt;

use tokio::time::Instant;

use scm_common::card::mask;

pub(crate) mod generic;
pub(crate) mod rfideas;

/// One print-server bridge, as the swipe path sees it.
pub(crate) trait Bridge: Send + Sync {
    /// The bridge's name in logs and journal details (`generic`, `rfideas`).
    fn name(&self) -> &'static str;
    /// Whether this bridge takes the swipes of `reader` at `machine`.
    fn route(&self, machine: u16, reader: &str) -> Route;
    /// Whether the device of `reader` at `machine` can take one more swipe now. A refusal
    /// is counted by the bridge (its busy metric). The swipe path asks every bridge a
    /// swipe is routed to before it journals the swipe as queued, so that a swipe is
    /// queued on all of them or refused as BUSY (and sent again by the agent): never taken
    /// by one bridge while another dropped it.
    fn admit(&self, machine: u16, reader: &str) -> Result<(), SubmitError>;
    /// Takes a swipe for delivery and returns at once; every swipe taken gets exactly one
    /// outcome report.
    fn submit(&self, machine: u16, reader: &str, swipe: BridgeSwipe) -> Result<(), SubmitError>;
}

/// Where a bridge records, before it writes swipes to a print server, that it is about to
/// (the swipe journal's `writing` state): a swipe the SCM died writing is never written
/// again after a restart.
pub(crate) trait WriteLog: Send + Sync {
    /// Records that the swipes `event_ids` are about to be written. The receiver, if any,
    /// is told once that record is committed; `None`: it could not be queued (counted and
    /// logged by the implementation), and the bridge writes anyway.
    fn writing(&self, event_ids: Vec<String>) -> Option<tokio::sync::oneshot::Receiver<()>>;
}

/// Whether a bridge takes the swipes of a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// No device of the bridge for this reader.
    None,
    /// A device that cannot deliver yet (a 241 device without a swipe URL: the print
    /// server has not configured it). It takes swipes only when no bridge is ready.
    NotConfigured,
    /// A device that delivers.
    Ready,
}

/// Identifies a device: a machine and one of its readers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DeviceKey {
    /// Machine id.
    pub machine: u16,
    /// Reader id.
    pub reader: String,
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.machine, self.reader)
    }
}

/// A swipe to deliver. Its `Debug` output masks the card number.
#[derive(Clone)]
pub(crate) struct BridgeSwipe {
    /// The agent's event id, echoed in the bridge's outcome report.
    pub event_id: String,
    /// The card number (written as is, followed by `\n`).
    pub card: String,
    /// After this instant the swipe is dropped, never written.
    pub expires_at: Instant,
    /// When the SCM received it (for `scm_swipe_forward_seconds`).
    pub received_at: Instant,
}

impl fmt::Debug for BridgeSwipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeSwipe")
            .field("event_id", &self.event_id)
            .field("card", &mask(&self.card))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why a bridge refused a swipe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SubmitError {
    /// No device of the bridge is configured for that machine and reader.
    #[error("no device is configured for this machine and reader")]
    NoDevice,
    /// The device's queue (Generic) or its swipes in flight (241) are at their bound.
    #[error("the device's queue is full ({max} swipes waiting); swipe refused")]
    QueueFull {
        /// The queue's bound (`queue_max`).
        max: usize,
    },
}

/// One swipe's outcome, sent by a bridge on its outcome channel (`O`: that bridge's kinds
/// of outcome).
#[derive(Debug, Clone)]
pub(crate) struct OutcomeReport<O> {
    /// The device.
    pub(crate) key: DeviceKey,
    /// The swipe's event id.
    pub(crate) event_id: String,
    /// What happened.
    pub(crate) outcome: O,
}
