//! The session registry: which agent link speaks for which machine (from where, since
//! when, in which protocol version). A machine has at most one live link; a newer link
//! replaces an older one, and an old link ending never removes its successor.
//!
//! [`SessionRegistry`] is the interface the link, the push path and the front ends use;
//! [`LocalSessions`] is today's in-process map. A shared implementation (several SCMs in
//! front of one fleet) would answer the same questions for links held by any of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use scm_common::lock::LockExt;

/// What an agent reports in its heartbeats of the swipes that never reached the SCM,
/// counted since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AgentRefusals {
    /// Refused by the agent's card rules.
    pub invalid: u64,
    /// Refused because the agent's queue was full.
    pub queue_full: u64,
    /// Dropped at the agent when their time to live ran out before an ACK.
    pub expired: u64,
}

/// A machine's live event link.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Peer address of the link.
    pub peer: SocketAddr,
    /// Protocol version of its HELLO.
    pub version: u8,
    /// Unix ms when the HELLO was accepted.
    pub connected_since_ms: i64,
    /// Config port address (`host:port`) the agent announced (version 1), if any.
    pub config_address: Option<String>,
    /// Card readers the agent announced (version 1).
    pub readers: Vec<String>,
    /// Distinguishes links of the same machine (the newest wins).
    pub link_id: u64,
    /// Where a CONFIG for the machine goes to be sent over this link (version 1).
    pub mailbox: Option<std::sync::Arc<crate::link::mailbox::Mailbox>>,
    /// The agent's last report of swipes it refused or dropped.
    pub refusals: AgentRefusals,
}

/// Who holds which machine's link.
pub(crate) trait SessionRegistry: Send + Sync + std::fmt::Debug {
    /// Registers a machine's link; a newer link replaces an older one.
    fn register(&self, id: u16, session: Session);
    /// Removes the machine's link if it is still `link_id`.
    fn unregister(&self, id: u16, link_id: u64);
    /// Records the agent's report on link `link_id` (ignored if that link was replaced).
    fn report_refusals(&self, id: u16, link_id: u64, refusals: AgentRefusals);
    /// The reports of every connected agent, summed.
    fn refusals_total(&self) -> AgentRefusals;
    /// The machine's live link, if any.
    fn session(&self, id: u16) -> Option<Session>;
    /// Number of connected machines.
    fn connected(&self) -> usize;
}

/// The registry of this process's links.
#[derive(Debug, Default)]
pub(crate) struct LocalSessions {
    sessions: Mutex<HashMap<u16, Session>>,
}

impl SessionRegistry for LocalSessions {
    fn register(&self, id: u16, session: Session) {
        self.sessions.lock_unpoisoned().insert(id, session);
    }

    fn unregister(&self, id: u16, link_id: u64) {
        let mut s = self.sessions.lock_unpoisoned();
        if s.get(&id).is_some_and(|x| x.link_id == link_id) {
            s.remove(&id);
        }
    }

    fn report_refusals(&self, id: u16, link_id: u64, refusals: AgentRefusals) {
        if let Some(s) = self
            .sessions
            .lock_unpoisoned()
            .get_mut(&id)
            .filter(|s| s.link_id == link_id)
        {
            s.refusals = refusals;
        }
    }

    fn refusals_total(&self) -> AgentRefusals {
        let s = self.sessions.lock_unpoisoned();
        s.values()
            .fold(AgentRefusals::default(), |t, s| AgentRefusals {
                invalid: t.invalid + s.refusals.invalid,
                queue_full: t.queue_full + s.refusals.queue_full,
                expired: t.expired + s.refusals.expired,
            })
    }

    fn session(&self, id: u16) -> Option<Session> {
        self.sessions.lock_unpoisoned().get(&id).cloned()
    }

    fn connected(&self) -> usize {
        self.sessions.lock_unpoisoned().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(link_id: u64) -> Session {
        Session {
            peer: "127.0.0.1:4000".parse().unwrap(),
            version: 1,
            connected_since_ms: 1,
            config_address: None,
            readers: vec!["r1".into()],
            link_id,
            mailbox: None,
            refusals: AgentRefusals::default(),
        }
    }

    #[test]
    fn the_newest_link_wins_and_an_old_one_ending_keeps_it() {
        let r = LocalSessions::default();
        r.register(3, link(1));
        r.register(3, link(2));
        assert_eq!(r.connected(), 1);
        r.unregister(3, 1);
        assert_eq!(
            r.session(3).map(|s| s.link_id),
            Some(2),
            "old link gone, new kept"
        );
        let report = AgentRefusals {
            invalid: 2,
            queue_full: 1,
            expired: 4,
        };
        r.report_refusals(3, 1, AgentRefusals::default());
        r.report_refusals(3, 2, report);
        r.register(4, link(3));
        r.report_refusals(4, 3, report);
        r.report_refusals(4, 9, AgentRefusals::default());
        assert_eq!(
            r.session(3).unwrap().refusals,
            report,
            "the old link's report is ignored"
        );
        assert_eq!(
            r.refusals_total(),
            AgentRefusals {
                invalid: 4,
                queue_full: 2,
                expired: 8
            }
        );
        r.unregister(4, 3);
        r.unregister(3, 2);
        assert!(r.session(3).is_none());
        assert_eq!(r.connected(), 0);
    }
}
