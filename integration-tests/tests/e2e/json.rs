//! `backoffice --output json` against a real fleet: every command's document (schema 1,
//! docs/operations.md), push outcomes per machine (ACK, already applied, NACK-free
//! refusal), and `watch` as one JSON object per line.

use integration_tests::{Fleet, swipe};
use serde_json::Value;

fn doc(out: &str) -> Value {
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[test]
fn every_command_answers_documented_json() {
    let fleet = Fleet::start(&[1, 2]);
    let dev = fleet.dev();
    let file = dev.join("m.cfg");
    std::fs::write(&file, "json=1\n").unwrap();
    let f = file.to_str().unwrap();
    let watch = fleet.watch(&["--output", "json", "--count", "2"]);
    watch.wait_for("watching events");

    // A fleet push: one outcome per machine.
    let (code, out, err) =
        fleet.backoffice(&["--output", "json", "push", "--target", "all", "--file", f]);
    assert_eq!(code, 0, "{out}{err}");
    let v = doc(&out);
    assert_eq!(v["schema"], 1);
    assert_eq!(v["command"], "push");
    assert_eq!(v["ok"], true);
    assert_eq!(v["exit"], 0);
    let outcomes = v["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 2, "{v}");
    for o in outcomes {
        assert_eq!(o["outcome"], "ack");
        assert_eq!(o["already_applied"], false);
        assert_eq!(o["generation"], 1);
    }
    assert_eq!(out.lines().count(), 1, "one document: {out}");

    // The same content again: ACK, already applied.
    let (code, out, _) =
        fleet.backoffice(&["push", "--machine", "1", "--file", f, "--output", "json"]);
    assert_eq!(code, 0);
    let v = doc(&out);
    assert_eq!(v["outcomes"][0]["already_applied"], true, "{v}");
    assert_eq!(v["outcomes"][0]["machine"], 1);

    // An unknown machine: exit 2, ok false, the SCM's reason in summary.
    let (code, out, _) =
        fleet.backoffice(&["--output", "json", "push", "--machine", "9", "--file", f]);
    assert_eq!(code, 2);
    let v = doc(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["code"], 550);
    assert!(v["summary"].as_str().unwrap().contains("not known"), "{v}");

    let (code, out, _) = fleet.backoffice(&["--output", "json", "machines"]);
    assert_eq!(code, 0);
    let v = doc(&out);
    assert_eq!(v["count"], 2);
    let m1 = &v["machines"][0];
    assert_eq!(m1["id"], 1);
    assert_eq!(m1["link"], "connected");
    assert_eq!(m1["desired_generation"], 1);
    assert_eq!(m1["applied_generation"], 1);
    assert!(m1["groups"].is_array());
    assert_eq!(m1["last_error"], Value::Null);

    let (code, out, _) = fleet.backoffice(&["--output", "json", "status", "1"]);
    assert_eq!(code, 0);
    let v = doc(&out);
    assert_eq!(v["machine"]["id"], 1);
    assert_eq!(v["machine"]["name"], "machine-1");
    assert!(
        v["fields"]["generation"]
            .as_str()
            .unwrap()
            .contains("applied 1"),
        "{v}"
    );
    assert_eq!(v["attempts"][0]["outcome"], "ack");

    let (code, out, _) = fleet.backoffice(&["--output", "json", "history", "1"]);
    assert_eq!(code, 0);
    let v = doc(&out);
    let g = &v["generations"][0];
    assert_eq!(g["generation"], 1);
    assert_eq!(g["bytes"], 7);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"json=1\n"));
    assert!(sha.starts_with(g["sha256"].as_str().unwrap()), "{g}");

    let (code, out, _) = fleet.backoffice(&["--output", "json", "audit"]);
    assert_eq!(code, 0);
    let v = doc(&out);
    let records = v["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["actor"] == "admin"
                && r["action"].as_str().unwrap_or("").starts_with("push all")),
        "{v}"
    );

    // A swipe with no print server connected is queued; the listing shows it masked.
    fleet.agent(1).wait_for("reader r1");
    swipe(&dev, 1, "12345678");
    fleet.agent(1).wait_for("swipe acknowledged by the SCM");
    let (code, out, _) = fleet.backoffice(&["--output", "json", "swipes"]);
    assert_eq!(code, 0);
    let v = doc(&out);
    let s = &v["swipes"][0];
    assert_eq!(s["machine"], 1);
    assert_eq!(s["reader"], "r1");
    assert!(!s["card"].as_str().unwrap().contains("1234"), "masked: {s}");
    assert!(!out.contains("12345678"));

    // watch: one JSON object per line, the two push events.
    let mut watch = watch;
    assert_eq!(watch.wait_exit(), Some(0), "{}", watch.logs());
    let lines: Vec<Value> = watch
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 2);
    for e in &lines {
        assert_eq!(e["schema"], 1);
        assert_eq!(e["kind"], "push");
        assert_eq!(e["outcome"], "ack");
        assert!(e["seq"].as_u64().unwrap() > 0);
    }
}

#[test]
fn text_stays_the_default_and_errors_are_json_too() {
    let fleet = Fleet::start(&[1]);
    let (code, out, _) = fleet.backoffice(&["machines"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ID "), "{out}");
    // No SCM there: exit 2 with a JSON error on stdout.
    let cfg = fleet.dev().join("backoffice.toml");
    let (code, out, err) = integration_tests::backoffice_with(
        &cfg,
        "127.0.0.1:1".parse().unwrap(),
        &["--output", "json", "machines"],
    );
    assert_eq!(code, 2, "{err}");
    let v = doc(&out);
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("cannot connect"),
        "{v}"
    );
}
