//! Fleet operations: choosing machines (one id, a group, a label, or all of them) and
//! pushing one configuration to many machines at once with live progress.
//!
//! A fleet push stores the content as every target machine's desired configuration in one
//! database transaction (a machine whose desired content is already the same keeps its
//! generation), then delivers with at most `limits.push_concurrency` deliveries in flight.
//! Each machine's outcome is the same as for a single push: ACK, NACK (final for that
//! generation), pending (retried with back-off and at the next HELLO), or superseded.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use scm_common::text::quoted;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::ops::Ops;
use crate::ops::push::{self, PushError, PushResult};
use crate::state::StoreError;
use serde::Deserialize;

/// `[[machine]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MachineConfig {
    /// Machine id (the frame ID field and the certificate's `urn:scm:machine:ID`).
    pub(crate) id: u16,
    /// Human name.
    #[serde(default)]
    pub(crate) name: String,
    /// Protocol version the machine speaks: 0 (original) or 1 (this project's agents).
    #[serde(default = "default_version")]
    pub(crate) protocol_version: u8,
    /// Where its config port is (`host:port`). If absent, the SCM uses the address of the
    /// machine's last HELLO and the port it reported (version 1), or delivers in-band on
    /// HELLO (version 0).
    #[serde(default)]
    pub(crate) config_addr: Option<String>,
    /// Groups the machine belongs to; `push group:NAME` targets every member.
    #[serde(default)]
    pub(crate) groups: Vec<String>,
    /// Free-form labels (for example `site=north`); `push label:TEXT` targets every
    /// machine carrying exactly that label.
    #[serde(default)]
    pub(crate) labels: Vec<String>,
    /// How a version-0 machine orders the bytes of ID and DATA_LENGTH.
    #[serde(default)]
    pub(crate) byte_order: crate::link::dialect::ByteOrder,
    /// How configurations reach the machine; `None` is the default for its version
    /// ([`MachineConfig::delivery`]).
    #[serde(default)]
    pub(crate) delivery: Option<Delivery>,
    /// Version 0: close the link once the machine has answered the in-band CONFIG
    /// (machines that open a new connection per message).
    #[serde(default)]
    pub(crate) close_after_config: bool,
}

/// How configurations reach a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Over the mutual-TLS link the machine holds to the SCM (version 1; a version-0
    /// machine gets it in-band, as the answer to its next HELLO).
    Link,
    /// The SCM connects to the machine's config port (`config_addr`, or the address
    /// the agent announces in HELLO).
    Port,
}

impl<'de> serde::Deserialize<'de> for Delivery {
    // By hand, so that a wrong value is answered with the two right ones and what they
    // are for, not with serde's "no variant" message.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "link" => Ok(Delivery::Link),
            "port" => Ok(Delivery::Port),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a delivery; use \"link\" (over the machine's own link to the SCM, the default for version 1) or \"port\" (the SCM connects to the machine's config port)"
            ))),
        }
    }
}

impl MachineConfig {
    /// How configurations reach this machine: as configured, else over the config port
    /// for version 0 (whose link only carries a CONFIG as the answer to HELLO) and for a
    /// machine given a `config_addr`, else over the link.
    pub(crate) fn delivery(&self) -> Delivery {
        self.delivery.unwrap_or(
            if self.protocol_version == 0 || self.config_addr.is_some() {
                Delivery::Port
            } else {
                Delivery::Link
            },
        )
    }
}

fn default_version() -> u8 {
    1
}

/// The configured machine with this id.
pub(crate) fn machine(machines: &[MachineConfig], id: u16) -> Option<&MachineConfig> {
    machines.iter().find(|m| m.id == id)
}

/// Which machines an operation is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One machine, by id (`7`).
    Machine(u16),
    /// Every member of a group (`group:lobby`).
    Group(String),
    /// Every machine carrying a label (`label:site=north`).
    Label(String),
    /// Every configured machine (`all`).
    All,
}

/// A target that could not be understood or matches nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectError {
    /// Not a target at all.
    #[error("{} is not a target; use a machine id (0-65535), group:NAME, label:TEXT or all", quoted(.0, 40))]
    Invalid(String),
    /// No such machine.
    #[error("machine {0} is not known to this SCM; `machines` lists the known ones")]
    UnknownMachine(u16),
    /// No machine is in the group.
    #[error("no machine is in group {}; known groups: {known}", quoted(name, 64))]
    UnknownGroup {
        /// The group asked for.
        name: String,
        /// The groups that exist, comma-separated (or "none").
        known: String,
    },
    /// No machine carries the label.
    #[error("no machine carries label {}; `machines` shows each machine's labels", quoted(.0, 64))]
    UnknownLabel(String),
    /// The SCM has no machines configured.
    #[error("no machines are configured; add [[machine]] entries to the SCM's configuration")]
    NoMachines,
}

impl FromStr for Target {
    type Err = SelectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Target::All);
        }
        if let Some(name) = s.strip_prefix("group:") {
            return if valid_name(name) {
                Ok(Target::Group(name.to_owned()))
            } else {
                Err(SelectError::Invalid(s.to_owned()))
            };
        }
        if let Some(label) = s.strip_prefix("label:") {
            return if valid_name(label) {
                Ok(Target::Label(label.to_owned()))
            } else {
                Err(SelectError::Invalid(s.to_owned()))
            };
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u16>()
                .map(Target::Machine)
                .map_err(|_| SelectError::Invalid(s.to_owned()));
        }
        Err(SelectError::Invalid(s.to_owned()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Machine(id) => write!(f, "machine {id}"),
            Target::Group(g) => write!(f, "group:{g}"),
            Target::Label(l) => write!(f, "label:{l}"),
            Target::All => f.write_str("all"),
        }
    }
}

impl Target {
    /// The target as an operator writes it (`7`, `group:lobby`, `label:x`, `all`): what
    /// [`FromStr`] reads back.
    pub fn selector(&self) -> String {
        match self {
            Target::Machine(id) => id.to_string(),
            Target::Group(g) => format!("group:{g}"),
            Target::Label(l) => format!("label:{l}"),
            Target::All => "all".into(),
        }
    }
}

/// Whether `s` may be used as a group name or a label: 1 to 64 characters from
/// `A-Z a-z 0-9 . _ - = :`.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-=:".contains(&b))
}

/// The machines `target` names, in id order.
pub(crate) fn select(machines: &[MachineConfig], target: &Target) -> Result<Vec<u16>, SelectError> {
    let mut ids: Vec<u16> = match target {
        Target::Machine(id) => {
            return if machine(machines, *id).is_some() {
                Ok(vec![*id])
            } else {
                Err(SelectError::UnknownMachine(*id))
            };
        }
        Target::All => machines.iter().map(|m| m.id).collect(),
        Target::Group(g) => machines
            .iter()
            .filter(|m| m.groups.iter().any(|x| x == g))
            .map(|m| m.id)
            .collect(),
        Target::Label(l) => machines
            .iter()
            .filter(|m| m.labels.iter().any(|x| x == l))
            .map(|m| m.id)
            .collect(),
    };
    if ids.is_empty() {
        return Err(match target {
            Target::Group(name) => {
                let known: Vec<String> = groups(machines).into_keys().collect();
                SelectError::UnknownGroup {
                    name: name.clone(),
                    known: if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    },
                }
            }
            Target::Label(l) => SelectError::UnknownLabel(l.clone()),
            _ => SelectError::NoMachines,
        });
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Every group and its members (in id order).
pub(crate) fn groups(machines: &[MachineConfig]) -> BTreeMap<String, Vec<u16>> {
    let mut out: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for m in machines {
        for g in &m.groups {
            out.entry(g.clone()).or_default().push(m.id);
        }
    }
    for ids in out.values_mut() {
        ids.sort_unstable();
    }
    out
}

/// Running totals of a fleet push.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Machines targeted.
    pub total: usize,
    /// Stored by the machine (or already applied).
    pub ack: usize,
    /// Refused by the machine.
    pub nack: usize,
    /// Not answered yet: in flight, or unreachable and left pending for retries.
    pub pending: usize,
    /// Overtaken by a newer generation before it was sent.
    pub superseded: usize,
    /// Could not be attempted (database error).
    pub failed: usize,
}

impl Progress {
    /// Everything pending, nothing answered yet.
    pub(crate) fn start(total: usize) -> Self {
        Progress {
            total,
            pending: total,
            ..Progress::default()
        }
    }

    /// Counts one machine's result (it leaves "pending" unless it stays pending).
    pub(crate) fn add(&mut self, result: &Result<PushResult, PushError>) {
        match result {
            Ok(PushResult::Ack { .. }) => self.ack += 1,
            Ok(PushResult::Nack { .. }) => self.nack += 1,
            Ok(PushResult::Unreachable { .. }) => return,
            Ok(PushResult::Superseded { .. }) => self.superseded += 1,
            Err(_) => self.failed += 1,
        }
        self.pending = self.pending.saturating_sub(1);
    }

    /// `940/1000 ACK, 3 NACK, 57 pending` (superseded and failed only when non-zero).
    pub(crate) fn line(&self) -> String {
        let mut s = format!(
            "{}/{} ACK, {} NACK, {} pending",
            self.ack, self.total, self.nack, self.pending
        );
        if self.superseded > 0 {
            s.push_str(&format!(", {} superseded", self.superseded));
        }
        if self.failed > 0 {
            s.push_str(&format!(", {} failed", self.failed));
        }
        s
    }
}

/// Stores `content` as the desired configuration of every machine in `ids` and delivers
/// it, at most `limits.push_concurrency` at a time. The machines and the content have
/// been checked by the caller ([`crate::ops::operator`], the one place that checks them). Progress is published on `progress`
/// after every answer. Returns each machine's result in id order.
pub(crate) async fn push_many(
    ops: &Arc<Ops>,
    ids: Vec<u16>,
    content: Vec<u8>,
    actor: &str,
    progress: Option<watch::Sender<Progress>>,
) -> Vec<(u16, Result<PushResult, PushError>)> {
    let mut totals = Progress::start(ids.len());
    let publish = |p: &Progress| {
        if let Some(tx) = &progress {
            tx.send_replace(*p);
        }
    };
    publish(&totals);
    let actor = actor.to_owned();
    let id_list = ids.clone();
    let generations = match ops
        .store
        .fleet()
        .create_generations(id_list, content, actor)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            let text = e.to_string();
            totals.failed = totals.total;
            totals.pending = 0;
            publish(&totals);
            return fail_all(&ids, || {
                PushError::Store(StoreError::Task(format!(
                    "{text}; nothing was stored or sent"
                )))
            });
        }
    };
    let limit = Arc::new(Semaphore::new(ops.settings.push_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for generation in generations {
        let ops = ops.clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            let id = generation.machine_id;
            let _permit = limit.acquire_owned().await;
            (
                id,
                push::deliver_with(&ops, generation, push::Sync::Batched)
                    .await
                    .map_err(PushError::from),
            )
        });
    }
    let mut results = Vec::with_capacity(ids.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((id, r)) => {
                totals.add(&r);
                publish(&totals);
                results.push((id, r));
            }
            Err(e) => tracing::error!("a delivery task failed: {e}"),
        }
    }
    // Group commit: the outcomes were recorded without waiting for the disk; one sync
    // makes them all durable before the operator is answered.
    if let Err(e) = ops.store.fleet().sync().await {
        tracing::error!("cannot sync the recorded push outcomes to disk: {e}");
    }
    results.sort_by_key(|(id, _)| *id);
    results
}

fn fail_all(ids: &[u16], err: impl Fn() -> PushError) -> Vec<(u16, Result<PushResult, PushError>)> {
    ids.iter().map(|id| (*id, Err(err()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The machine list, as the `[[machine]]` tables of a configuration file give it.
    struct Fleet {
        machines: Vec<MachineConfig>,
    }

    fn cfg() -> Fleet {
        #[derive(serde::Deserialize)]
        struct File {
            machine: Vec<MachineConfig>,
        }
        let text = r#"
            [[machine]]
            id = 1
            groups = ["lobby", "floor-2"]
            labels = ["site=north"]
            [[machine]]
            id = 3
            groups = ["lobby"]
            [[machine]]
            id = 2
            labels = ["site=north"]
        "#;
        let f: File = toml::from_str(text).expect("parse");
        Fleet {
            machines: f.machine,
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!("7".parse(), Ok(Target::Machine(7)));
        assert_eq!("all".parse(), Ok(Target::All));
        assert_eq!("ALL".parse(), Ok(Target::All));
        assert_eq!("group:lobby".parse(), Ok(Target::Group("lobby".into())));
        assert_eq!(
            "label:site=north".parse(),
            Ok(Target::Label("site=north".into()))
        );
        for t in ["7", "all", "group:lobby", "label:site=north"] {
            assert_eq!(t.parse::<Target>().unwrap().selector(), t);
        }
        for bad in [
            "",
            "x",
            "group:",
            "group:a b",
            "70000",
            "-1",
            "label:",
            "1,2",
        ] {
            assert!(
                matches!(bad.parse::<Target>(), Err(SelectError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn selection_by_group_label_and_all() {
        let c = cfg();
        assert_eq!(select(&c.machines, &Target::All), Ok(vec![1, 2, 3]));
        assert_eq!(
            select(&c.machines, &Target::Group("lobby".into())),
            Ok(vec![1, 3])
        );
        assert_eq!(
            select(&c.machines, &Target::Group("floor-2".into())),
            Ok(vec![1])
        );
        assert_eq!(
            select(&c.machines, &Target::Label("site=north".into())),
            Ok(vec![1, 2])
        );
        assert_eq!(select(&c.machines, &Target::Machine(2)), Ok(vec![2]));
        assert_eq!(
            select(&c.machines, &Target::Machine(9)),
            Err(SelectError::UnknownMachine(9))
        );
        let e = select(&c.machines, &Target::Group("roof".into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no machine is in group \"roof\"; known groups: floor-2, lobby"
        );
        assert!(matches!(
            select(&c.machines, &Target::Label("site=south".into())),
            Err(SelectError::UnknownLabel(_))
        ));
    }

    #[test]
    fn groups_lists_members() {
        let g = groups(&cfg().machines);
        assert_eq!(g.get("lobby"), Some(&vec![1, 3]));
        assert_eq!(g.len(), 2);
    }

    #[test]
    fn progress_line() {
        let mut p = Progress::start(1000);
        for _ in 0..940 {
            p.add(&Ok(PushResult::Ack {
                generation: 1,
                detail: String::new(),
            }));
        }
        for _ in 0..3 {
            p.add(&Ok(PushResult::Nack {
                generation: 1,
                detail: String::new(),
            }));
        }
        p.add(&Ok(PushResult::Unreachable {
            generation: 1,
            detail: String::new(),
        }));
        assert_eq!(p.line(), "940/1000 ACK, 3 NACK, 57 pending");
        p.add(&Ok(PushResult::Superseded {
            generation: 1,
            by: 2,
        }));
        assert_eq!(p.line(), "940/1000 ACK, 3 NACK, 56 pending, 1 superseded");
    }
}
