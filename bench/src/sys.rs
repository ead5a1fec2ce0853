//! What the benchmark reads from /proc: a process's CPU time and resident memory, the
//! machine's total CPU time (to tell how busy *other* processes kept the machine during a
//! run), the load average, and the machine's description for the report.

use std::process::Command;

/// Clock ticks per second of /proc's CPU times (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU time (user + system, all threads) of a process, in milliseconds.
pub fn proc_cpu_ms(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) * 1000.0 / TICKS_PER_S
}

/// Resident memory of a process, in KiB.
pub fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Busy CPU time of the whole machine (all cores, everything but idle and iowait), ms.
pub fn machine_busy_ms() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = s.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy * 1000.0 / TICKS_PER_S
}

/// The 1-minute load average as printed in /proc/loadavg (first three fields).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The soft limit on open files of this process (from /proc/self/limits).
pub fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// CPUs this process may run on (`Cpus_allowed_list`).
pub fn own_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// One line per fact about the machine, for the report.
pub fn machine_description() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let lscpu = Command::new("lscpu")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |name: &str| {
        lscpu
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    out.push(("CPU".into(), field("Model name")));
    out.push(("CPUs".into(), field("CPU(s)")));
    out.push(("Hypervisor".into(), field("Hypervisor vendor")));
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    out.push(("Memory".into(), mem));
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out.push(("Kernel".into(), kernel));
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_string()
            })
        })
        .unwrap_or_default();
    out.push(("OS".into(), os));
    out
}

/// Measures how much CPU processes other than the listed ones used over an interval.
#[derive(Debug, Clone, Copy)]
pub struct OtherCpu {
    start_busy: f64,
    start_own: f64,
    start: std::time::Instant,
}

impl OtherCpu {
    /// Starts the interval; `own` is the CPU time (ms) of the processes that belong to
    /// the measurement (the server under test and the load generator).
    pub fn start(own: f64) -> Self {
        Self {
            start_busy: machine_busy_ms(),
            start_own: own,
            start: std::time::Instant::now(),
        }
    }

    /// Percent of one core used by other processes since `start` (100 = one full core).
    pub fn percent(&self, own_now: f64) -> f64 {
        let wall = self.start.elapsed().as_secs_f64() * 1000.0;
        if wall <= 0.0 {
            return 0.0;
        }
        let other = (machine_busy_ms() - self.start_busy) - (own_now - self.start_own);
        (other.max(0.0) / wall) * 100.0
    }
}

/// CPU time of this process (all threads), ms.
pub fn self_cpu_ms() -> f64 {
    proc_cpu_ms(std::process::id())
}
