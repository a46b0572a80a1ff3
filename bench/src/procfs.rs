//! What /proc says about memory and CPU time.

use std::fs;

use crate::Result;

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM, ...).
pub fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0, `echo 5 > /proc/PID/clear_refs`).
pub fn reset_hwm(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU time the whole machine has spent busy (not idle or waiting for I/O) since boot, in
/// milliseconds, from /proc/stat; `None` where that cannot be read.
pub fn busy_cpu_ms() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...: user, nice, system, irq, softirq.
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    // USER_HZ is 100 on Linux.
    Some(busy as f64 * 10.0)
}

/// CPU time (user + system) process `pid` has used, in milliseconds, from /proc/PID/stat.
pub fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * 10.0)
}

/// Time `pid` has run on a CPU, in nanoseconds (the first field of /proc/PID/schedstat).
fn own_cpu_ns(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time of one /proc/PID/stat: (own user + system, reaped children's user + system), ms.
fn cpu_fields(pid: u32) -> Option<(f64, f64, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let n = |i: usize| f.get(i)?.parse::<u64>().ok();
    // A live process's own time from /proc/PID/schedstat (nanoseconds) where readable: its
    // utime and stime are whole ticks, each rounded down, so hundreds of long-lived processes
    // that each ran less than a tick (IMAP connections kept between sessions) would read 0.
    let own = own_cpu_ns(pid)
        .map(|ns| ns as f64 / 1e6)
        .unwrap_or((n(11)? + n(12)?) as f64 * 10.0);
    let children = (n(13)? + n(14)?) as f64 * 10.0;
    Some((own, children, f.get(1)?.parse().ok()?))
}

/// CPU time, ms, of a process tree rooted at `root` (a Dovecot master): its own, that of its
/// children it has reaped (Dovecot's login and mail processes live one session each and are
/// reaped by the master), and that of its children still alive (auth, anvil, log, ...). A
/// difference of two readings is what the tree spent in between, up to processes that
/// straddle the readings.
pub fn tree_cpu_ms(root: u32) -> Option<f64> {
    let (own, reaped, _) = cpu_fields(root)?;
    let mut total = own + reaped;
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((own, reaped, ppid)) = cpu_fields(pid) {
            if ppid == root {
                total += own + reaped;
            }
        }
    }
    Some(total)
}
