//! `scm init-dev --bind IP` alone gives a fleet that works on that address: the SCM, the
//! agents and the back office agree on it, and a push is ACKed. Loopback 127.0.0.0/8 is
//! all usable, so 127.0.0.22 stands for "some specific address of this host".

use std::collections::HashMap;
use std::path::Path;

use integration_tests::{Proc, bin, run};

const IP: &str = "127.0.0.22";

/// Every `"IP:PORT"` in `text` with its port replaced: by `ports[PORT]` when given, else
/// by 0 (the harness never uses fixed ports). Returns the text and the ports it saw.
fn rewrite(text: &str, ports: &HashMap<u16, u16>) -> (String, Vec<u16>) {
    let needle = format!("\"{IP}:");
    let mut seen = Vec::new();
    let out = text
        .lines()
        .map(|l| {
            let Some(at) = l.find(&needle) else {
                return l.to_string();
            };
            let start = at + needle.len();
            let len = l[start..].find('"').expect("a quoted address");
            let port: u16 = l[start..start + len].parse().expect("a port");
            seen.push(port);
            let new = ports.get(&port).copied().unwrap_or(0);
            format!("{}{new}{}", &l[..start], &l[start + len..])
        })
        .collect::<Vec<_>>()
        .join("\n");
    (out + "\n", seen)
}

fn rewrite_file(path: &Path, ports: &HashMap<u16, u16>) -> Vec<u16> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        !text.contains("127.0.0.1:"),
        "{} still points at 127.0.0.1:\n{text}",
        path.display()
    );
    let (text, seen) = rewrite(&text, ports);
    std::fs::write(path, text).unwrap();
    seen
}

#[test]
fn init_dev_with_a_bind_address_alone_gives_a_working_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev");
    let (code, stdout, stderr) = run(
        &bin("scm"),
        &[
            "init-dev",
            "--out",
            dev.to_str().unwrap(),
            "--machines",
            "1,2",
            "--bind",
            IP,
        ],
        &[],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let password = stdout
        .lines()
        .find_map(|l| l.strip_prefix("operator login: admin / "))
        .expect("the password is printed")
        .trim()
        .to_string();
    let init = std::fs::read_to_string(dev.join("init.txt")).expect("init.txt written");
    assert!(
        init.contains(&format!("operator login: admin / {password}\n")),
        "{init}"
    );

    // Every listener of the SCM on the bind address, port 0.
    let seen = rewrite_file(&dev.join("scm.toml"), &HashMap::new());
    assert!(seen.contains(&9300) && seen.contains(&2323), "{seen:?}");
    let scm = Proc::spawn(
        "scm",
        &bin("scm"),
        &["serve", "--config", dev.join("scm.toml").to_str().unwrap()],
        &[],
    );
    let agents = scm.listening("agents");
    let telnet = scm.listening("telnet");
    assert_eq!(agents.ip().to_string(), IP);
    assert_eq!(telnet.ip().to_string(), IP);

    // The agents as generated, only the SCM's port made the real one.
    let to_scm = HashMap::from([(9300, agents.port())]);
    let mut procs = Vec::new();
    for id in [1u16, 2] {
        let cfg = dev.join(format!("agent-{id}.toml"));
        let seen = rewrite_file(&cfg, &to_scm);
        assert!(
            seen.contains(&9300),
            "agent {id} dials the SCM at {IP}: {seen:?}"
        );
        let agent = Proc::spawn(
            &format!("agent-{id}"),
            &bin("machine-agent"),
            &["--config", cfg.to_str().unwrap()],
            &[],
        );
        agent.wait_for("connected to SCM");
        assert!(
            !agent.logs().contains("(config)"),
            "as generated, an agent needs no listening port: {}",
            agent.logs()
        );
        procs.push(agent);
    }

    // The back office as generated, only the telnet port made the real one.
    let bo = dev.join("backoffice.toml");
    let seen = rewrite_file(&bo, &HashMap::from([(2323, telnet.port())]));
    assert!(seen.contains(&2323), "{seen:?}");
    let text = std::fs::read_to_string(&bo).unwrap();
    assert!(text.contains(&password), "{text}");
    let file = dir.path().join("a.cfg");
    std::fs::write(&file, "tray = 22\n").unwrap();
    let file = file.to_str().unwrap();
    let backoffice = |args: &[&str]| {
        let mut full = vec!["--config", bo.to_str().unwrap()];
        full.extend_from_slice(args);
        run(&bin("backoffice"), &full, &[])
    };
    for id in ["1", "2"] {
        let (code, out, err) = backoffice(&["push", "--machine", id, "--file", file]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.starts_with(&format!("250 ACK machine {id} generation 1")),
            "{out}"
        );
        let stored = std::fs::read_to_string(dev.join(format!("machine-{id}/config.current")));
        assert_eq!(stored.unwrap(), "tray = 22\n");
    }
    let (code, out, _) = backoffice(&["status", "1"]);
    assert_eq!(code, 0, "{out}");
    // With no config port, an agent's link leaves from whichever address the OS picks.
    assert!(out.contains("link: connected from "), "{out}");
    assert!(out.contains("delivery: over the machine's link"), "{out}");
}
