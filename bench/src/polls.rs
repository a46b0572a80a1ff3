//! `polls`: what most POP3 sessions are. Every user logs in, STAT, UIDL, RETRs what is new
//! (one user in ten has one new message each phase), QUIT. First at a fixed arrival rate well
//! below saturation (open loop: latency counts from the scheduled start, so a backlog shows),
//! then at saturation (a fixed number of clients polling back to back). Per phase: session
//! latency p50/p99, CPU per poll of Dovecot's processes plus popbridge, and of the machine.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::corpus::Rng;
use crate::feel::percentile;
use crate::pop3::{self, Download, Endpoint};
use crate::{median, ms, procfs, Ctx, Result, PASSWORD};

/// Messages every poll user starts with.
const START_MSGS: u64 = 5;

/// Each user's known unique ids, per side.
type Known = Arc<Vec<Mutex<HashSet<String>>>>;

struct Phase {
    got: Vec<Option<Download>>,
    errs: Vec<String>,
    latency_ms: Vec<f64>,
    wall: Duration,
    machine_ms: Option<f64>,
    dovecot_ms: Option<f64>,
    popbridge_ms: Option<f64>,
}

/// Polls every user once: `workers` threads; with `rate`, session i starts at i / rate seconds
/// (latency from that moment), else back to back (latency from the session's own start).
fn phase(ep: &Endpoint, known: &Known, rate: Option<f64>, workers: usize) -> Phase {
    let n = known.len();
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let (ep, known, next) = (ep.clone(), known.clone(), next.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut out = Vec::new();
                    loop {
                        let u = next.fetch_add(1, Ordering::SeqCst);
                        if u >= n {
                            return out;
                        }
                        let start = match rate {
                            Some(r) => {
                                let due = t0 + Duration::from_secs_f64(u as f64 / r);
                                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                due
                            }
                            None => Instant::now(),
                        };
                        let mut k = known[u].lock().unwrap_or_else(|p| p.into_inner());
                        let r = pop3::poll(&ep, &format!("poll{u}"), PASSWORD, &mut k)
                            .map_err(|e| format!("poll{u}: {e}"));
                        out.push((u, r, start.elapsed()));
                    }
                })
        })
        .collect();
    let mut got: Vec<Option<Download>> = vec![None; n];
    let (mut errs, mut latency_ms) = (Vec::new(), Vec::new());
    for h in handles {
        match h.map(|h| h.join()) {
            Ok(Ok(v)) => {
                for (u, r, lat) in v {
                    match r {
                        Ok(d) => {
                            latency_ms.push(ms(lat));
                            got[u] = Some(d);
                        }
                        Err(e) => errs.push(e),
                    }
                }
            }
            Ok(Err(_)) => errs.push("client thread panicked".into()),
            Err(e) => errs.push(format!("spawn: {e}")),
        }
    }
    Phase {
        got,
        errs,
        latency_ms,
        wall: t0.elapsed(),
        machine_ms: None,
        dovecot_ms: None,
        popbridge_ms: None,
    }
}

impl Ctx {
    fn dovecot_master(&self) -> Option<u32> {
        std::fs::read_to_string(self.dc.dir().join("run/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// One new message for every user `u` with `u % 10 == slot`.
    fn poll_deliver(&mut self, n: usize, slot: usize, round: u64) -> Result<()> {
        for u in (slot..n).step_by(10) {
            let mut rng = Rng::new(50_000 + round * 10_000 + u as u64);
            let size = rng.log_uniform(1000, 8000);
            let m = self
                .pool
                .message(900_000 + round * 10_000 + u as u64, size, &mut rng);
            self.dc.try_seed(&format!("poll{u}"), std::iter::once(m))?;
        }
        Ok(())
    }

    /// A measured phase on one side, with CPU readings around it.
    fn poll_phase(
        &self,
        ep: &Endpoint,
        known: &Known,
        rate: Option<f64>,
        workers: usize,
        pb_pid: u32,
    ) -> Phase {
        let master = self.dovecot_master();
        let m0 = procfs::busy_cpu_ms();
        let d0 = master.and_then(procfs::tree_cpu_ms);
        let p0 = procfs::process_cpu_ms(pb_pid);
        let mut p = phase(ep, known, rate, workers);
        let n = known.len() as f64;
        p.machine_ms = procfs::busy_cpu_ms().zip(m0).map(|(b, a)| (b - a) / n);
        p.dovecot_ms = master
            .and_then(procfs::tree_cpu_ms)
            .zip(d0)
            .map(|(b, a)| (b - a) / n);
        p.popbridge_ms = procfs::process_cpu_ms(pb_pid)
            .zip(p0)
            .map(|(b, a)| (b - a) / n);
        p
    }

    pub fn polls(&mut self) -> Result<()> {
        eprintln!("popbridge-bench: scenario polls");
        let n = self.feel.poll_users(self.smoke);
        let rate = self.feel.poll_rate.unwrap_or(20.0);
        let clients = self.feel.poll_clients.unwrap_or(32);
        let t = Instant::now();
        for u in 0..n {
            let mut rng = Rng::new(70_000 + u as u64);
            let pool = &self.pool;
            let msgs = (0..START_MSGS).map(|i| {
                let size = rng.log_uniform(1000, 8000);
                pool.message(800_000 + u as u64 * 100 + i, size, &mut rng)
            });
            self.dc.try_seed(&format!("poll{u}"), msgs)?;
        }
        eprintln!(
            "popbridge-bench: seeded {n} poll users in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let mut pb = self.popbridge()?;
        let (d_ep, b_ep) = (self.d_plain(), Self::b_plain(&pb));
        let fresh = || -> Known { Arc::new((0..n).map(|_| Mutex::new(HashSet::new())).collect()) };
        let (d_known, b_known) = (fresh(), fresh());
        // Warm-up: every user's first poll downloads what is there (untimed).
        for (side, ep, known) in [("D", &d_ep, &d_known), ("B", &b_ep, &b_known)] {
            let p = phase(ep, known, None, 16);
            for e in p.errs.iter().take(5) {
                self.fail(format!("polls {side} warm-up: {e}"));
            }
        }
        let mut round = 0u64;
        let mut results: Vec<(String, Vec<Phase>, Vec<Phase>)> = Vec::new();
        for (label, phase_rate, workers) in [
            (format!("{n} users at {rate}/s"), Some(rate), 64),
            (
                format!("{n} users, saturation ({clients} clients)"),
                None,
                clients,
            ),
        ] {
            let (mut dv, mut bv) = (Vec::new(), Vec::new());
            for r in 0..self.runs {
                round += 1;
                self.poll_deliver(n, (round % 10) as usize, round)?;
                let mut pair = [None, None];
                for side in if r % 2 == 0 { ["D", "B"] } else { ["B", "D"] } {
                    let (ep, known, i) = if side == "D" {
                        (&d_ep, &d_known, 0)
                    } else {
                        (&b_ep, &b_known, 1)
                    };
                    let p = self.poll_phase(ep, known, phase_rate, workers, pb.pid());
                    eprintln!(
                        "  polls {label} run {r} {side}: {:.1} s, {:.0} polls/s, p50 {:.1} ms, p99 {:.1} ms, {} errors, CPU/poll dovecot {:.2} popbridge {:.2} machine {:.2} ms",
                        p.wall.as_secs_f64(),
                        n as f64 / p.wall.as_secs_f64(),
                        percentile(&p.latency_ms, 50.0),
                        percentile(&p.latency_ms, 99.0),
                        p.errs.len(),
                        p.dovecot_ms.unwrap_or(f64::NAN),
                        p.popbridge_ms.unwrap_or(f64::NAN),
                        p.machine_ms.unwrap_or(f64::NAN),
                    );
                    for e in p.errs.iter().take(5) {
                        self.fail(format!("polls {label} {side} run {r}: {e}"));
                    }
                    pair[i] = Some(p);
                }
                let [Some(d), Some(b)] = pair else {
                    unreachable!("both sides ran")
                };
                for u in 0..n {
                    if let (Some(dg), Some(bg)) = (&d.got[u], &b.got[u]) {
                        self.check(&format!("polls {label} run {r} poll{u}"), "B", dg, bg);
                    }
                }
                dv.push(d);
                bv.push(b);
            }
            results.push((label, dv, bv));
        }
        pb.check_alive()?;
        for (label, dv, bv) in results {
            self.poll_rows(&label, &dv, &bv);
        }
        Ok(())
    }

    fn poll_rows(&mut self, label: &str, dv: &[Phase], bv: &[Phase]) {
        let med = |v: &[Phase], f: &dyn Fn(&Phase) -> Option<f64>| -> Option<f64> {
            let x: Vec<f64> = v.iter().filter_map(f).collect();
            (!x.is_empty()).then(|| median(&x))
        };
        let saturation = label.contains("saturation");
        if saturation {
            let rate = |p: &Phase| Some(p.got.len() as f64 / p.wall.as_secs_f64());
            let (d, b) = (med(dv, &rate), med(bv, &rate));
            self.row(
                "polls",
                &format!("{label}: polls/s"),
                d,
                b,
                d.zip(b).map(|(d, b)| b / d),
                "info",
                None,
            );
        }
        for (q, name) in [(50.0, "p50"), (99.0, "p99")] {
            let lat = |p: &Phase| Some(percentile(&p.latency_ms, q));
            let (d, b) = (med(dv, &lat), med(bv, &lat));
            let target = q == 99.0 && !saturation;
            let ratio = d.zip(b).map(|(d, b)| b / d);
            self.row(
                "polls",
                &format!("{label}: {name} session ms"),
                d,
                b,
                ratio,
                if target { "<= 1.0 (time)" } else { "info" },
                if target {
                    ratio.map(|r| r <= 1.0)
                } else {
                    None
                },
            );
        }
        let dovecot = |p: &Phase| p.dovecot_ms;
        let both = |p: &Phase| Some(p.dovecot_ms? + p.popbridge_ms?);
        let (d, b) = (med(dv, &dovecot), med(bv, &both));
        let ratio = d.zip(b).map(|(d, b)| b / d);
        self.row(
            "polls",
            &format!("{label}: CPU ms per poll, Dovecot + popbridge"),
            d,
            b,
            ratio,
            if saturation { "info" } else { "<= 1.0" },
            if saturation {
                None
            } else {
                ratio.map(|r| r <= 1.0)
            },
        );
        let own = |p: &Phase| p.popbridge_ms;
        self.row(
            "polls",
            &format!("{label}: of which popbridge"),
            None,
            med(bv, &own),
            None,
            "info",
            None,
        );
        let machine = |p: &Phase| p.machine_ms;
        let (d, b) = (med(dv, &machine), med(bv, &machine));
        self.row(
            "polls",
            &format!("{label}: machine CPU ms per poll"),
            d,
            b,
            d.zip(b).map(|(d, b)| b / d),
            "info",
            None,
        );
        let fetched =
            |p: &Phase| Some(p.got.iter().flatten().map(|d| d.messages).sum::<u64>() as f64);
        self.row(
            "polls",
            &format!("{label}: new messages RETR'd per phase"),
            med(dv, &fetched),
            med(bv, &fetched),
            None,
            "info",
            None,
        );
    }
}
