//! RFC 1143 "Q method" telnet option negotiator ([`Negotiator`]).
//!
//! Tracks, per option, our side ("us": WILL/WONT sent, DO/DONT received) and the
//! peer's side ("him": DO/DONT sent, WILL/WONT received) in the states No, Yes,
//! WantNo and WantYes, with the RFC 1143 queue bit. Everything is refused by
//! default. It never loops: a refused request is answered once, a reply is never
//! answered.
//!
//! TIMING-MARK (RFC 860) is a one-shot request: every `DO TIMING-MARK` is answered
//! `WONT TIMING-MARK`, which RFC 860 allows and which keeps the option off on both
//! sides, so the next `DO TIMING-MARK` is again a fresh request. By the time the
//! reply is sent, the codec has already processed everything that preceded the
//! `DO`, which is what the peer wants to know (inetutils telnet discards output
//! after Ctrl-C until it gets this answer).

use crate::codec::{Out, Verb};
use crate::consts::opt::TIMING_MARK;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Q {
    #[default]
    No,
    Yes,
    WantNo,
    WantYes,
}

/// One side of one option. `Some(true)` from the methods means "send the
/// positive verb" (WILL or DO), `Some(false)` the negative one.
#[derive(Debug, Clone, Copy, Default)]
struct Side {
    q: Q,
    /// RFC 1143 queue bit: the opposite of the pending request is wanted.
    queued: bool,
    /// Whether a peer request to enable is accepted.
    allowed: bool,
}

impl Side {
    fn request(&mut self, enable: bool) -> Option<bool> {
        match (self.q, enable) {
            (Q::No, true) => {
                self.q = Q::WantYes;
                Some(true)
            }
            (Q::Yes, false) => {
                self.q = Q::WantNo;
                Some(false)
            }
            (Q::WantNo, true) | (Q::WantYes, false) => {
                self.queued = true;
                None
            }
            (Q::WantNo, false) | (Q::WantYes, true) => {
                self.queued = false;
                None
            }
            (Q::No, false) | (Q::Yes, true) => None,
        }
    }

    fn received(&mut self, enable: bool) -> Option<bool> {
        // The queue bit only matters in the Want states, which this call leaves.
        let queued = std::mem::take(&mut self.queued);
        match (self.q, enable) {
            (Q::No, true) => {
                if self.allowed {
                    self.q = Q::Yes;
                }
                Some(self.allowed)
            }
            (Q::Yes, false) => {
                self.q = Q::No;
                Some(false)
            }
            // Error in the peer (our disable answered by enable): accept its state.
            (Q::WantNo, true) => {
                self.q = if queued { Q::Yes } else { Q::No };
                None
            }
            (Q::WantNo, false) if queued => {
                self.q = Q::WantYes;
                Some(true)
            }
            (Q::WantYes, true) if queued => {
                self.q = Q::WantNo;
                Some(false)
            }
            (Q::WantYes, true) => {
                self.q = Q::Yes;
                None
            }
            (Q::WantNo | Q::WantYes, false) => {
                self.q = Q::No;
                None
            }
            (Q::No, false) | (Q::Yes, true) => None,
        }
    }
}

/// RFC 1143 option negotiator; see the module docs.
#[derive(Debug, Clone)]
pub struct Negotiator {
    us: [Side; 256],
    him: [Side; 256],
}

impl Default for Negotiator {
    fn default() -> Self {
        Self::new()
    }
}

fn reply(positive: bool, verbs: (Verb, Verb), option: u8) -> Out {
    Out::Negotiate(if positive { verbs.0 } else { verbs.1 }, option)
}

impl Negotiator {
    /// A negotiator with every option off and every peer request refused.
    pub fn new() -> Self {
        Self {
            us: [Side::default(); 256],
            him: [Side::default(); 256],
        }
    }

    /// Whether we accept the peer asking us to enable `option` (`DO`).
    pub fn allow_us(&mut self, option: u8, allowed: bool) {
        self.us[usize::from(option)].allowed = allowed;
    }

    /// Whether we accept the peer offering to enable `option` (`WILL`).
    pub fn allow_him(&mut self, option: u8, allowed: bool) {
        self.him[usize::from(option)].allowed = allowed;
    }

    /// Asks to enable/disable `option` on our side; returns the WILL/WONT to send,
    /// or `None` if already in (or negotiating towards) that state. Works whatever
    /// [`allow_us`](Self::allow_us) says.
    pub fn request_us(&mut self, option: u8, enable: bool) -> Option<Out> {
        self.us[usize::from(option)]
            .request(enable)
            .map(|p| reply(p, (Verb::Will, Verb::Wont), option))
    }

    /// Asks the peer to enable/disable `option` on its side; returns the DO/DONT to
    /// send, or `None` if already in (or negotiating towards) that state.
    pub fn request_him(&mut self, option: u8, enable: bool) -> Option<Out> {
        self.him[usize::from(option)]
            .request(enable)
            .map(|p| reply(p, (Verb::Do, Verb::Dont), option))
    }

    /// Processes an incoming negotiation; returns the reply to send, if any.
    pub fn received(&mut self, verb: Verb, option: u8) -> Option<Out> {
        let idx = usize::from(option);
        if verb == Verb::Do && option == TIMING_MARK {
            self.us[idx] = Side {
                allowed: self.us[idx].allowed,
                ..Side::default()
            };
            return Some(Out::Negotiate(Verb::Wont, TIMING_MARK));
        }
        match verb {
            Verb::Do | Verb::Dont => self.us[idx]
                .received(verb == Verb::Do)
                .map(|p| reply(p, (Verb::Will, Verb::Wont), option)),
            Verb::Will | Verb::Wont => {
                let out = self.him[idx]
                    .received(verb == Verb::Will)
                    .map(|p| reply(p, (Verb::Do, Verb::Dont), option));
                if option == TIMING_MARK && self.him[idx].q == Q::Yes {
                    // One-shot: our DO TIMING-MARK was answered.
                    self.him[idx].q = Q::No;
                }
                out
            }
        }
    }

    /// Whether `option` is enabled on our side.
    pub fn us_enabled(&self, option: u8) -> bool {
        self.us[usize::from(option)].q == Q::Yes
    }

    /// Whether `option` is enabled on the peer's side.
    pub fn him_enabled(&self, option: u8) -> bool {
        self.him[usize::from(option)].q == Q::Yes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::codec::tests::Rng;
    use crate::consts::opt::{ECHO, NAWS, SGA, TTYPE};

    fn n(verb: Verb, option: u8) -> Option<Out> {
        Some(Out::Negotiate(verb, option))
    }

    #[test]
    fn refuses_everything_by_default_and_never_answers_replies() {
        let mut neg = Negotiator::default();
        for option in [0, ECHO, SGA, NAWS, 200, 255] {
            assert_eq!(neg.received(Verb::Will, option), n(Verb::Dont, option));
            assert_eq!(neg.received(Verb::Do, option), n(Verb::Wont, option));
            assert_eq!(neg.received(Verb::Wont, option), None);
            assert_eq!(neg.received(Verb::Dont, option), None);
            assert!(!neg.us_enabled(option) && !neg.him_enabled(option));
        }
    }

    #[test]
    fn allowed_peer_offer_is_accepted_once() {
        let mut neg = Negotiator::new();
        neg.allow_him(SGA, true);
        neg.allow_us(SGA, true);
        assert_eq!(neg.received(Verb::Will, SGA), n(Verb::Do, SGA));
        assert!(neg.him_enabled(SGA));
        assert_eq!(neg.received(Verb::Will, SGA), None);
        assert_eq!(neg.received(Verb::Do, SGA), n(Verb::Will, SGA));
        assert!(neg.us_enabled(SGA));
        assert_eq!(neg.received(Verb::Do, SGA), None);
        assert_eq!(neg.received(Verb::Wont, SGA), n(Verb::Dont, SGA));
        assert!(!neg.him_enabled(SGA));
        assert_eq!(neg.received(Verb::Dont, SGA), n(Verb::Wont, SGA));
        assert!(!neg.us_enabled(SGA));
        assert_eq!(neg.request_him(SGA, false), None);
    }

    #[test]
    fn echo_offered_around_password_while_unsolicited_do_echo_is_refused() {
        let mut neg = Negotiator::new();
        // PuTTY at connect.
        assert_eq!(neg.received(Verb::Do, ECHO), n(Verb::Wont, ECHO));
        assert!(!neg.us_enabled(ECHO));
        assert_eq!(neg.request_us(ECHO, true), n(Verb::Will, ECHO));
        assert_eq!(neg.request_us(ECHO, true), None);
        assert!(!neg.us_enabled(ECHO));
        assert_eq!(neg.received(Verb::Do, ECHO), None);
        assert!(neg.us_enabled(ECHO));
        assert_eq!(neg.request_us(ECHO, true), None);
        assert_eq!(neg.request_us(ECHO, false), n(Verb::Wont, ECHO));
        assert_eq!(neg.request_us(ECHO, false), None);
        assert_eq!(neg.received(Verb::Dont, ECHO), None);
        assert!(!neg.us_enabled(ECHO));
        // Peer refuses our offer.
        assert_eq!(neg.request_us(ECHO, true), n(Verb::Will, ECHO));
        assert_eq!(neg.received(Verb::Dont, ECHO), None);
        assert!(!neg.us_enabled(ECHO));
        // Asking the peer.
        assert_eq!(neg.request_him(NAWS, true), n(Verb::Do, NAWS));
        assert_eq!(neg.received(Verb::Will, NAWS), None);
        assert!(neg.him_enabled(NAWS));
        assert_eq!(neg.request_him(NAWS, false), n(Verb::Dont, NAWS));
        assert_eq!(neg.received(Verb::Wont, NAWS), None);
        assert!(!neg.him_enabled(NAWS));
    }

    #[test]
    fn queue_bit_follows_rfc_1143() {
        let mut neg = Negotiator::new();
        assert_eq!(neg.request_us(ECHO, true), n(Verb::Will, ECHO));
        assert_eq!(neg.request_us(ECHO, false), None); // queued
        assert_eq!(neg.received(Verb::Do, ECHO), n(Verb::Wont, ECHO));
        assert!(!neg.us_enabled(ECHO));
        assert_eq!(neg.received(Verb::Dont, ECHO), None);
        assert!(!neg.us_enabled(ECHO));
        // Queue and cancel.
        assert_eq!(neg.request_us(ECHO, true), n(Verb::Will, ECHO));
        assert_eq!(neg.request_us(ECHO, false), None);
        assert_eq!(neg.request_us(ECHO, true), None);
        assert_eq!(neg.received(Verb::Do, ECHO), None);
        assert!(neg.us_enabled(ECHO));
        // WantNo with the enable queued, answered by DONT: ask again.
        assert_eq!(neg.request_us(ECHO, false), n(Verb::Wont, ECHO));
        assert_eq!(neg.request_us(ECHO, true), None);
        assert_eq!(neg.received(Verb::Dont, ECHO), n(Verb::Will, ECHO));
        assert_eq!(neg.received(Verb::Do, ECHO), None);
        assert!(neg.us_enabled(ECHO));
        // Peer error: DONT answered by DO.
        assert_eq!(neg.request_us(ECHO, false), n(Verb::Wont, ECHO));
        assert_eq!(neg.received(Verb::Do, ECHO), None);
        assert!(!neg.us_enabled(ECHO));
    }

    #[test]
    fn timing_mark_is_answered_every_time() {
        let mut neg = Negotiator::new();
        for _ in 0..3 {
            assert_eq!(
                neg.received(Verb::Do, TIMING_MARK),
                n(Verb::Wont, TIMING_MARK)
            );
            assert!(!neg.us_enabled(TIMING_MARK));
        }
        neg.allow_us(TIMING_MARK, true);
        assert_eq!(
            neg.received(Verb::Do, TIMING_MARK),
            n(Verb::Wont, TIMING_MARK)
        );
        assert_eq!(neg.received(Verb::Dont, TIMING_MARK), None);
        // As the sender of DO TIMING-MARK, each request is a new one.
        for answer in [Verb::Will, Verb::Wont, Verb::Will] {
            assert_eq!(neg.request_him(TIMING_MARK, true), n(Verb::Do, TIMING_MARK));
            assert_eq!(neg.received(answer, TIMING_MARK), None);
            assert!(!neg.him_enabled(TIMING_MARK));
        }
    }

    /// Two negotiators with random policies and requests, messages delivered in
    /// random order: the exchange terminates and both sides agree.
    #[test]
    fn two_negotiators_never_loop_and_agree() {
        const OPTIONS: [u8; 4] = [ECHO, SGA, NAWS, TTYPE];
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for _ in 0..2000 {
            let mut peers = [Negotiator::new(), Negotiator::new()];
            for peer in &mut peers {
                for option in OPTIONS {
                    peer.allow_us(option, rng.below(2) == 0);
                    peer.allow_him(option, rng.below(2) == 0);
                }
            }
            // wire[i]: messages in flight towards peers[i].
            let mut wire = [VecDeque::new(), VecDeque::new()];
            let mut requests = 0;
            let mut delivered = 0;
            loop {
                let from = rng.below(2);
                if requests < 8 && rng.below(3) == 0 {
                    requests += 1;
                    let option = OPTIONS[rng.below(OPTIONS.len())];
                    let enable = rng.below(2) == 0;
                    let out = if rng.below(2) == 0 {
                        peers[from].request_us(option, enable)
                    } else {
                        peers[from].request_him(option, enable)
                    };
                    wire[1 - from].extend(out);
                } else if let Some(Out::Negotiate(verb, option)) = wire[from].pop_front() {
                    delivered += 1;
                    wire[1 - from].extend(peers[from].received(verb, option));
                } else if requests >= 8 && wire.iter().all(VecDeque::is_empty) {
                    break;
                }
                assert!(delivered <= 40, "negotiation loops");
            }
            for option in OPTIONS {
                assert_eq!(peers[0].us_enabled(option), peers[1].him_enabled(option));
                assert_eq!(peers[1].us_enabled(option), peers[0].him_enabled(option));
            }
        }
    }
}
