//! Writes fuzz seed corpora from the malformed-input tables (`integration-tests/tables`):
//! one directory per fuzz target under `--out`, one file per seed, in the input layout each
//! target expects (`fuzz/fuzz_targets/*.rs`). Used by `fuzz/run-ci.sh`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use integration_tests::tables;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Write fuzz seed corpora from the malformed-input tables")]
struct Args {
    /// Output directory; gets one subdirectory per fuzz target.
    #[arg(long)]
    out: PathBuf,
    /// Directory of the tables.
    #[arg(long)]
    tables: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.tables.unwrap_or_else(tables::dir);
    let mut seeds: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
    let mut add =
        |target: &'static str, bytes: Vec<u8>| seeds.entry(target).or_default().push(bytes);
    for name in tables::names(&dir) {
        let table = tables::load_from(&dir, &name);
        for case in &table.cases {
            let b = case.bytes();
            match name.as_str() {
                "frames" => {
                    // frame_decoder: first byte is where the input is cut in two chunks.
                    let mut s = vec![0xff];
                    s.extend_from_slice(&b);
                    add("frame_decoder", s);
                    // v1_payload: CODE byte, then the payload of a version-1 frame.
                    if b.len() >= 6 && b[0] == 1 {
                        let mut s = vec![b[1]];
                        s.extend_from_slice(&b[6..]);
                        add("v1_payload", s);
                    }
                }
                "telnet" => {
                    // telnet_codec: first byte chooses the mode switch point.
                    let mut s = vec![0xff];
                    s.extend_from_slice(&b);
                    add("telnet_codec", s);
                    for line in b.split(|c| *c == b'\n') {
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        if !line.is_empty() && std::str::from_utf8(line).is_ok() {
                            add("operator_command", line.to_vec());
                        }
                    }
                }
                "generic" => add("generic_input", b),
                "http241" => add("http241_request", b),
                "admin" => {}
                other => anyhow::bail!("table {other:?} has no fuzz target; map it here"),
            }
        }
    }
    let mut total = 0;
    for (target, list) in &seeds {
        let d = args.out.join(target);
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        for (i, s) in list.iter().enumerate() {
            std::fs::write(d.join(format!("table-{i:04}")), s)
                .with_context(|| format!("write a seed into {}", d.display()))?;
        }
        println!("{target}: {} seeds", list.len());
        total += list.len();
    }
    anyhow::ensure!(total > 0, "no seeds written from {}", dir.display());
    Ok(())
}
