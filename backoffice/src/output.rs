//! Machine-readable output (`backoffice --output json`): turns the SCM's telnet replies and
//! admin API events into JSON documents of a documented, versioned shape (schema
//! [`SCHEMA`], described in docs/operations.md). Every document carries `schema`,
//! `command`, the reply `code` and `lines` (the reply's text lines, as the text output
//! prints them), plus fields parsed from those lines. Fields are only ever added within a
//! schema version; a removed or changed field bumps it.

use serde_json::{Value, json};

use crate::client::Reply;

/// The version of the JSON shape. Consumers should check it.
pub const SCHEMA: u32 = 1;

/// Text (the default) or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines, as the SCM sends them.
    #[default]
    Text,
    /// One JSON document (one object per line for `watch`).
    Json,
}

fn base(command: &str, r: &Reply) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("schema".into(), json!(SCHEMA));
    m.insert("command".into(), json!(command));
    m.insert("code".into(), json!(r.code));
    m.insert("ok".into(), json!((200..300).contains(&r.code)));
    m.insert("lines".into(), json!(r.lines));
    m
}

/// Splits `s` at char `at` (or at its end).
fn take(s: &str, at: usize) -> (&str, &str) {
    match s.char_indices().nth(at) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

fn dash_none(s: &str) -> Value {
    let s = s.trim();
    if s.is_empty() || s == "-" {
        Value::Null
    } else {
        json!(s)
    }
}

/// One row of `machines` (fixed-width columns: id 6, name 16, version 3, link 10,
/// desired 7, applied 7, two spaces, groups 20, last error).
fn machine_row(line: &str) -> Option<Value> {
    let (id, rest) = take(line, 7);
    let id: u16 = id.trim().parse().ok()?;
    let (name, rest) = take(rest, 17);
    let (ver, rest) = take(rest, 4);
    let (link, rest) = take(rest, 11);
    let (desired, rest) = take(rest, 8);
    let (applied, rest) = take(rest, 9);
    let (groups, err) = take(rest, 21);
    let groups: Vec<&str> = match groups.trim() {
        "" | "-" => Vec::new(),
        g => g.split(',').collect(),
    };
    Some(json!({
        "id": id,
        "name": name.trim(),
        "protocol_version": ver.trim().parse::<u32>().ok(),
        "link": link.trim(),
        "desired_generation": desired.trim().parse::<u64>().ok(),
        "applied_generation": applied.trim().parse::<u64>().ok(),
        "groups": groups,
        "last_error": dash_none(err),
    }))
}

/// `machines`: `machines` (id, name, protocol_version, link, desired_generation,
/// applied_generation, groups, last_error), `count`.
pub fn machines(r: &Reply) -> Value {
    let mut m = base("machines", r);
    let rows: Vec<Value> = r
        .lines
        .iter()
        .skip(1)
        .filter_map(|l| machine_row(l))
        .collect();
    m.insert("count".into(), json!(rows.len()));
    m.insert("machines".into(), Value::Array(rows));
    Value::Object(m)
}

/// `status ID`: `machine` (id, name), `fields` (every `key: value` line; the first one
/// wins), `attempts` (time, generation, outcome, detail).
pub fn status(id: u16, r: &Reply) -> Value {
    let mut m = base("status", r);
    let mut fields = serde_json::Map::new();
    let mut attempts = Vec::new();
    let mut name = Value::Null;
    for (i, l) in r.lines.iter().enumerate() {
        if i == 0 {
            if let Some(n) = l.split_once(" (").and_then(|(_, n)| n.strip_suffix(')')) {
                name = json!(n);
            }
            continue;
        }
        if let Some(a) = l.strip_prefix("attempt: ") {
            attempts.push(attempt(a));
            continue;
        }
        if let Some((k, v)) = l.split_once(": ")
            && !fields.contains_key(k)
        {
            fields.insert(k.to_string(), json!(v));
        }
    }
    m.insert("machine".into(), json!({ "id": id, "name": name }));
    m.insert("fields".into(), Value::Object(fields));
    m.insert("attempts".into(), Value::Array(attempts));
    Value::Object(m)
}

/// `TIME generation G OUTCOME: DETAIL`.
fn attempt(a: &str) -> Value {
    let (head, detail) = a.split_once(": ").unwrap_or((a, ""));
    let w: Vec<&str> = head.split_whitespace().collect();
    json!({
        "at": w.first(),
        "generation": w.get(2).and_then(|g| g.parse::<u64>().ok()),
        "outcome": w.get(3),
        "detail": detail,
    })
}

/// `history ID`: `generations` (generation, bytes, sha256 (the prefix the SCM shows),
/// by, at, outcome).
pub fn history(id: u16, r: &Reply) -> Value {
    let mut m = base("history", r);
    let mut gens = Vec::new();
    for l in &r.lines {
        // generation G N bytes sha256 HEX by USER at TIME: OUTCOME
        let Some(rest) = l.strip_prefix("generation ") else {
            continue;
        };
        let (head, outcome) = rest.split_once(": ").unwrap_or((rest, ""));
        let w: Vec<&str> = head.split_whitespace().collect();
        if w.len() < 8 {
            continue;
        }
        gens.push(json!({
            "generation": w[0].parse::<u64>().ok(),
            "bytes": w[1].parse::<u64>().ok(),
            "sha256": w[4],
            "by": w[6],
            "at": w.get(8),
            "outcome": outcome,
        }));
    }
    m.insert("machine".into(), json!(id));
    m.insert("generations".into(), Value::Array(gens));
    Value::Object(m)
}

/// `swipes`: `swipes` (at, machine, reader, card (masked), outcome, detail), `summary`.
pub fn swipes(r: &Reply) -> Value {
    let mut m = base("swipes", r);
    let mut rows = Vec::new();
    let n = r.lines.len();
    for l in r.lines.iter().take(n.saturating_sub(1)) {
        // TIME machine M reader R card C OUTCOME: DETAIL
        let (head, detail) = l.split_once(": ").unwrap_or((l, ""));
        let w: Vec<&str> = head.split_whitespace().collect();
        if w.len() < 8 {
            continue;
        }
        rows.push(json!({
            "at": w[0],
            "machine": w[2].parse::<u16>().ok(),
            "reader": w[4],
            "card": w[6],
            "outcome": w[7],
            "detail": detail,
        }));
    }
    m.insert("swipes".into(), Value::Array(rows));
    m.insert("summary".into(), json!(r.lines.last()));
    Value::Object(m)
}

/// `audit`: `records` (at, actor, source, action (the rest of the line)).
pub fn audit(r: &Reply) -> Value {
    let mut m = base("audit", r);
    let mut rows = Vec::new();
    let n = r.lines.len();
    for l in r.lines.iter().take(n.saturating_sub(1)) {
        // TIME ACTOR from SOURCE: ACTION DETAIL
        let (head, action) = l.split_once(": ").unwrap_or((l, ""));
        let w: Vec<&str> = head.split_whitespace().collect();
        if w.len() < 4 || w[2] != "from" {
            continue;
        }
        rows.push(json!({ "at": w[0], "actor": w[1], "source": w[3], "action": action }));
    }
    m.insert("records".into(), Value::Array(rows));
    Value::Object(m)
}

/// One machine's outcome in a push reply line (with or without its code):
/// `ACK machine ID generation G: DETAIL`, `NACK ...`, `machine ID unreachable; generation
/// G pending ...: DETAIL`, `machine ID generation G superseded: ...`.
pub fn push_outcome(line: &str) -> Option<Value> {
    let line = match crate::client::parse_reply_line(line) {
        Some((_, _, text)) => text,
        None => line,
    };
    let (head, detail) = line.split_once(": ").unwrap_or((line, ""));
    let w: Vec<&str> = head.split_whitespace().collect();
    let num = |i: usize| {
        w.get(i)
            .and_then(|s| s.trim_end_matches(';').parse::<u64>().ok())
    };
    let (outcome, machine, generation) = match w.as_slice() {
        ["ACK", "machine", _, "generation", _] => ("ack", num(2)?, num(4)?),
        ["NACK", "machine", _, "generation", _] => ("nack", num(2)?, num(4)?),
        [
            "machine",
            _,
            "unreachable;",
            "generation",
            _,
            "pending,",
            ..,
        ] => ("pending", num(1)?, num(4)?),
        ["machine", _, "generation", _, "superseded"] => ("superseded", num(1)?, num(3)?),
        _ => return None,
    };
    Some(json!({
        "machine": machine,
        "generation": generation,
        "outcome": outcome,
        "already_applied": outcome == "ack" && detail.starts_with("already applied"),
        "detail": detail,
    }))
}

/// `push` and `rollback`: `target`, `outcomes` (machine, generation, outcome = `ack` |
/// `nack` | `pending` | `superseded`, already_applied, detail), `summary` (the last line),
/// `exit` (the exit status).
pub fn push(command: &str, target: &str, r: &Reply, exit: u8) -> Value {
    let mut m = base(command, r);
    let outcomes: Vec<Value> = r.lines.iter().filter_map(|l| push_outcome(l)).collect();
    m.insert("target".into(), json!(target));
    m.insert("outcomes".into(), Value::Array(outcomes));
    m.insert("summary".into(), json!(r.last()));
    m.insert("exit".into(), json!(exit));
    Value::Object(m)
}

/// One admin API event (`watch`): schema, seq, at, at_ms, kind = `connected` |
/// `disconnected` | `push` | `swipe` | `lagged` | `unknown`, and the event's fields.
pub fn event(e: &scm_proto::admin::Event) -> Value {
    use scm_proto::admin::event::Kind;
    let mut m = serde_json::Map::new();
    m.insert("schema".into(), json!(SCHEMA));
    m.insert("command".into(), json!("watch"));
    m.insert("seq".into(), json!(e.seq));
    m.insert("at".into(), json!(crate::admin::fmt_ms(e.at_ms)));
    m.insert("at_ms".into(), json!(e.at_ms));
    let (kind, fields) = match &e.kind {
        Some(Kind::Connected(c)) => (
            "connected",
            json!({ "machine": c.machine_id, "peer": c.peer_address, "protocol_version": c.protocol_version }),
        ),
        Some(Kind::Disconnected(d)) => (
            "disconnected",
            json!({ "machine": d.machine_id, "peer": d.peer_address }),
        ),
        Some(Kind::Push(p)) => (
            "push",
            json!({
                "machine": p.machine_id,
                "generation": p.generation,
                "outcome": crate::admin::outcome_name(p.outcome).to_ascii_lowercase(),
                "detail": p.detail,
            }),
        ),
        Some(Kind::Swipe(s)) => (
            "swipe",
            json!({
                "machine": s.machine_id,
                "reader": s.reader,
                "card": s.card_masked,
                "outcome": s.outcome,
                "detail": s.detail,
            }),
        ),
        Some(Kind::Lagged(l)) => ("lagged", json!({ "dropped": l.dropped })),
        None => ("unknown", json!({})),
    };
    m.insert("kind".into(), json!(kind));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply {
            code,
            lines: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn machines_table_parses_by_column() {
        let r = reply(
            250,
            &[
                "ID     NAME             VER LINK       DESIRED APPLIED  GROUPS               LAST ERROR",
                "1      machine one      1   connected        3       2  dev,odd              NACK: bad line 2",
                "2      machine-2        0   down             0       0  -                    -",
                "2 machines",
            ],
        );
        let v = machines(&r);
        assert_eq!(v["schema"], 1);
        assert_eq!(v["count"], 2);
        let m = &v["machines"][0];
        assert_eq!(m["id"], 1);
        assert_eq!(m["name"], "machine one");
        assert_eq!(m["link"], "connected");
        assert_eq!(m["desired_generation"], 3);
        assert_eq!(m["applied_generation"], 2);
        assert_eq!(m["groups"], json!(["dev", "odd"]));
        assert_eq!(m["last_error"], "NACK: bad line 2");
        assert_eq!(v["machines"][1]["groups"], json!([]));
        assert_eq!(v["machines"][1]["last_error"], Value::Null);
    }

    #[test]
    fn push_lines_become_outcomes() {
        let a = push_outcome("250 ACK machine 1 generation 4: already applied; not sent again")
            .unwrap();
        assert_eq!(a["outcome"], "ack");
        assert_eq!(a["already_applied"], true);
        let n = push_outcome("NACK machine 2 generation 5: line 3: unknown key").unwrap();
        assert_eq!(n["outcome"], "nack");
        assert_eq!(n["machine"], 2);
        assert_eq!(n["detail"], "line 3: unknown key");
        let p = push_outcome("450 machine 3 unreachable; generation 6 pending, retried with back-off and at its next HELLO: refused").unwrap();
        assert_eq!(p["outcome"], "pending");
        assert_eq!(p["generation"], 6);
        let s = push_outcome("251 machine 3 generation 6 superseded: generation 7 is newer and is the one delivered; not sent").unwrap();
        assert_eq!(s["outcome"], "superseded");
        assert!(push_outcome("250 all: 2/2 ACK, 0 NACK, 0 pending").is_none());
    }

    #[test]
    fn history_audit_and_swipes_parse() {
        let h = history(
            1,
            &reply(
                250,
                &[
                    "generation 1 4 bytes sha256 fe3209d6d4f51935 by admin at 2026-12-03T11:43:59.394Z: ack",
                    "1 generations of machine 1",
                ],
            ),
        );
        assert_eq!(h["generations"][0]["sha256"], "fe3209d6d4f51935");
        assert_eq!(h["generations"][0]["bytes"], 4);
        assert_eq!(h["generations"][0]["outcome"], "ack");
        let a = audit(&reply(
            250,
            &[
                "2026-12-03T11:43:59.425Z admin from 127.0.0.1:53320: push machine 1 generation 1 (4 bytes): ack",
                "1 audit records shown",
            ],
        ));
        assert_eq!(a["records"][0]["actor"], "admin");
        assert_eq!(
            a["records"][0]["action"],
            "push machine 1 generation 1 (4 bytes): ack"
        );
        let s = swipes(&reply(
            250,
            &[
                "2026-12-03T11:43:59.425Z machine 1 reader r1 card ****7890 delivered: card delivered to 127.0.0.1:5",
                "1 swipes shown; since start: ...",
            ],
        ));
        assert_eq!(s["swipes"][0]["card"], "****7890");
        assert_eq!(s["swipes"][0]["outcome"], "delivered");
        assert_eq!(s["summary"], "1 swipes shown; since start: ...");
    }
}
