//! `wan`: the IMAP store far away. A latency relay ([`crate::relay`]) sits between popbridge
//! and Dovecot's IMAP (B: client, popbridge, relay, IMAP) and between the client and Dovecot's
//! POP3 (D: client, relay, POP3: POP3 straight to the far server). Per workload and one-way
//! delay: session speed, and the round trips and commands that crossed the far link. With
//! `--wan-peers`, other POP3 proxies run in popbridge's place for context (client, proxy,
//! relay, Dovecot's POP3), in rows of their own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use popbridge_testkit::pop3_proxy::Pop3Proxy;

use crate::corpus::Rng;
use crate::feel::Workload;
use crate::pop3::{self, Download, Endpoint};
use crate::relay::{Counts, Relay};
use crate::{mb, median, ms, servers, Ctx, Result, PASSWORD};

/// The far-link delay where the targets apply (25 ms one way, 50 ms round trip).
const TARGET_DELAY_MS: f64 = 25.0;

/// One figure of a session.
type Figure = dyn Fn(&Download, &Counts) -> f64;

struct Measured {
    d: Vec<(Download, Counts)>,
    b: Vec<(Download, Counts)>,
    /// Per peer (in `--wan-peers` order), its sessions.
    peers: Vec<(&'static str, Vec<(Download, Counts)>)>,
}

impl Ctx {
    fn wan_seed(&mut self, w: Workload) -> Result<&'static str> {
        let pool = &self.pool;
        Ok(match w {
            Workload::Mixed => {
                self.seed_tput()?;
                "tput"
            }
            Workload::Small => {
                let mut rng = Rng::new(4);
                let n = self.sizes.tput_msgs;
                let msgs = (0..n).map(|i| {
                    let size = 2000 + rng.next() % 6001;
                    pool.message(i, size, &mut rng)
                });
                self.dc.try_seed("wsmall", msgs)?;
                "wsmall"
            }
            Workload::Huge => {
                let mut rng = Rng::new(2);
                let msgs = (0..self.sizes.huge_msgs).map(|i| {
                    let size = rng.log_uniform(600, 2000);
                    pool.message(i, size, &mut rng)
                });
                self.dc.try_seed("whuge", msgs)?;
                "whuge"
            }
            Workload::Big => {
                let mut rng = Rng::new(3);
                let m = pool.message(0, self.sizes.big_bytes, &mut rng);
                self.dc.try_seed("wbig", std::iter::once(m))?;
                "wbig"
            }
        })
    }

    /// The wan scenario: every workload at every delay, D and B alternating.
    pub fn wan(&mut self) -> Result<()> {
        eprintln!("popbridge-bench: scenario wan");
        let delays = self.feel.delays(self.smoke);
        let runs = self.feel.wan_runs.unwrap_or(1).max(1);
        let limit = self.feel.wan_messages.unwrap_or(u64::MAX);
        let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let d_relay = Relay::start(local(self.dc.pop3_port()), Duration::ZERO)?;
        let b_relay = Relay::start(local(self.dc.imap_port()), Duration::ZERO)?;
        self.pb_seq += 1;
        let mut pb = servers::start_popbridge_upstream(
            &self.bin,
            &self.dc,
            self.root.join(format!("pb{}", self.pb_seq)),
            &self.pb_extra,
            b_relay.port(),
        )?;
        let d_direct = self.d_plain();
        let d_ep = Endpoint {
            addr: d_relay.addr(),
            tls: None,
        };
        let b_ep = Self::b_plain(&pb);
        // Other proxies in popbridge's place, in front of the same far POP3 as D.
        let mut peers = Vec::new();
        for peer in self.feel.wan_peers.clone() {
            let dir = self.root.join(format!("peer-{peer:?}").to_lowercase());
            let p = Pop3Proxy::start(peer.kind(), &dir, d_relay.addr())?;
            let ep = Endpoint {
                addr: local(p.port()),
                tls: None,
            };
            peers.push((p, ep));
        }
        for w in self.feel.workloads() {
            let user = self.wan_seed(w)?;
            let session = move |ep: &Endpoint| -> std::io::Result<Download> {
                match w {
                    Workload::Mixed | Workload::Small => {
                        pop3::download_first(ep, user, PASSWORD, limit)
                    }
                    Workload::Huge => pop3::list_only(ep, user, PASSWORD),
                    Workload::Big => pop3::download_all(ep, user, PASSWORD),
                }
            };
            // Untimed warm-up without delay: Dovecot's index, \Seen, popbridge's state cache.
            d_relay.set_delay(Duration::ZERO);
            b_relay.set_delay(Duration::ZERO);
            let reference = self.session(&format!("wan {w:?} D warm-up"), || session(&d_direct))?;
            let warm = self.session(&format!("wan {w:?} B warm-up"), || session(&b_ep))?;
            self.check(&format!("wan {w:?}"), "popbridge", &reference, &warm);
            for (p, ep) in &peers {
                let got =
                    self.session(&format!("wan {w:?} {} warm-up", p.name()), || session(ep))?;
                self.check(&format!("wan {w:?}"), p.name(), &reference, &got);
            }
            for &delay in &delays {
                let one_way = Duration::from_secs_f64(delay / 1000.0);
                d_relay.set_delay(one_way);
                b_relay.set_delay(one_way);
                let mut m = Measured {
                    d: Vec::new(),
                    b: Vec::new(),
                    peers: peers.iter().map(|(p, _)| (p.name(), Vec::new())).collect(),
                };
                for r in 0..runs {
                    for side in if r % 2 == 0 { ["D", "B"] } else { ["B", "D"] } {
                        let (ep, relay) = if side == "D" {
                            (&d_ep, &d_relay)
                        } else {
                            (&b_ep, &b_relay)
                        };
                        relay.take();
                        let t = Instant::now();
                        let got = self
                            .session(&format!("wan {w:?} {delay} ms {side} run {r}"), || {
                                session(ep)
                            })?;
                        // The relay forwards the last bytes (LOGOUT, QUIT) after the client is done.
                        std::thread::sleep(one_way * 2 + Duration::from_millis(20));
                        let counts = relay.take();
                        self.check(&format!("wan {w:?} {delay} ms"), side, &reference, &got);
                        eprintln!(
                            "  wan {w:?} {delay} ms run {r} {side}: {:.2} s, {} round trips, {} commands, {} connections",
                            t.elapsed().as_secs_f64(),
                            counts.round_trips,
                            counts.client_lines,
                            counts.connections
                        );
                        if side == "D" {
                            m.d.push((got, counts));
                        } else {
                            m.b.push((got, counts));
                        }
                    }
                    for (i, (p, ep)) in peers.iter().enumerate() {
                        d_relay.take();
                        let t = Instant::now();
                        let label = format!("wan {w:?} {delay} ms {} run {r}", p.name());
                        let got = self.session(&label, || session(ep))?;
                        std::thread::sleep(one_way * 2 + Duration::from_millis(20));
                        let counts = d_relay.take();
                        self.check(&format!("wan {w:?} {delay} ms"), p.name(), &reference, &got);
                        eprintln!(
                            "  {label}: {:.2} s, {} round trips, {} commands, {} connections",
                            t.elapsed().as_secs_f64(),
                            counts.round_trips,
                            counts.client_lines,
                            counts.connections
                        );
                        m.peers[i].1.push((got, counts));
                    }
                }
                self.wan_rows(w, delay, &m);
                self.peer_rows(w, delay, &m);
            }
        }
        pb.check_alive()?;
        Ok(())
    }

    fn wan_rows(&mut self, w: Workload, delay: f64, m: &Measured) {
        let at_target = (delay - TARGET_DELAY_MS).abs() < 1e-9;
        let rtt = format!("RTT {} ms", delay * 2.0);
        let f = |v: &[(Download, Counts)], g: &dyn Fn(&Download, &Counts) -> f64| {
            median(&v.iter().map(|(d, c)| g(d, c)).collect::<Vec<_>>())
        };
        let msgs = m.d.first().map(|(d, _)| d.messages).unwrap_or(0);
        match w {
            Workload::Mixed | Workload::Small => {
                let rate = |d: &Download, _: &Counts| d.messages as f64 / d.elapsed.as_secs_f64();
                let (d, b) = (f(&m.d, &rate), f(&m.b, &rate));
                let goal = if w == Workload::Mixed { 20.0 } else { 50.0 };
                let name = if w == Workload::Mixed {
                    "mixed"
                } else {
                    "2-8 KB"
                };
                self.row(
                    "wan",
                    &format!("{rtt}, {msgs} {name}: msgs/s"),
                    Some(d),
                    Some(b),
                    Some(b / d),
                    &if at_target {
                        format!(">= {goal}")
                    } else {
                        "info".into()
                    },
                    at_target.then_some(b / d >= goal),
                );
            }
            Workload::Huge => {
                let t = |d: &Download, _: &Counts| ms(d.elapsed);
                let (d, b) = (f(&m.d, &t), f(&m.b, &t));
                self.row(
                    "wan",
                    &format!("{rtt}, {msgs}-message listing: session ms"),
                    Some(d),
                    Some(b),
                    Some(b / d),
                    if at_target { "<= 1.0 (time)" } else { "info" },
                    at_target.then_some(b / d <= 1.0),
                );
            }
            Workload::Big => {
                let rate = |d: &Download, _: &Counts| mb(d.bytes) / d.retr[0].1.as_secs_f64();
                let (d, b) = (f(&m.d, &rate), f(&m.b, &rate));
                self.row(
                    "wan",
                    &format!("{rtt}, {:.0} MB message: RETR MB/s", mb(m.d[0].0.bytes)),
                    Some(d),
                    Some(b),
                    Some(b / d),
                    if at_target { ">= 0.9" } else { "info" },
                    at_target.then_some(b / d >= 0.9),
                );
            }
        }
        let rt = |_: &Download, c: &Counts| c.round_trips as f64;
        let small_target = at_target && w == Workload::Small;
        let b_rt = f(&m.b, &rt);
        self.row(
            "wan",
            &format!("{rtt}, {w:?}: far-link round trips per session"),
            Some(f(&m.d, &rt)),
            Some(b_rt),
            None,
            if small_target { "B <= 8" } else { "info" },
            small_target.then_some(b_rt <= 8.0),
        );
        let cmds = |_: &Download, c: &Counts| c.client_lines as f64;
        self.row(
            "wan",
            &format!("{rtt}, {w:?}: far-link commands per session"),
            Some(f(&m.d, &cmds)),
            Some(f(&m.b, &cmds)),
            None,
            "info",
            None,
        );
    }

    /// The peers' rows: the workload's figure with the peer in B's column, and its far-link
    /// round trips (information only: they are context, not targets).
    fn peer_rows(&mut self, w: Workload, delay: f64, m: &Measured) {
        let rtt = format!("RTT {} ms", delay * 2.0);
        let f = |v: &[(Download, Counts)], g: &Figure| {
            median(&v.iter().map(|(d, c)| g(d, c)).collect::<Vec<_>>())
        };
        let msgs = m.d.first().map(|(d, _)| d.messages).unwrap_or(0);
        let rate = |d: &Download, _: &Counts| d.messages as f64 / d.elapsed.as_secs_f64();
        let time = |d: &Download, _: &Counts| ms(d.elapsed);
        let big = |d: &Download, _: &Counts| mb(d.bytes) / d.retr[0].1.as_secs_f64();
        let (what, g): (String, &Figure) = match w {
            Workload::Mixed => (format!("{msgs} mixed: msgs/s"), &rate),
            Workload::Small => (format!("{msgs} 2-8 KB: msgs/s"), &rate),
            Workload::Huge => (format!("{msgs}-message listing: session ms"), &time),
            Workload::Big => {
                let bytes = m.d.first().map(|(d, _)| d.bytes).unwrap_or(0);
                (format!("{:.0} MB message: RETR MB/s", mb(bytes)), &big)
            }
        };
        let rt = |_: &Download, c: &Counts| c.round_trips as f64;
        for (name, v) in &m.peers {
            if v.is_empty() {
                continue;
            }
            let (d, p) = (f(&m.d, g), f(v, g));
            self.row(
                "wan",
                &format!("{rtt}, {what}, {name} in B's column"),
                Some(d),
                Some(p),
                Some(p / d),
                "info",
                None,
            );
            self.row(
                "wan",
                &format!("{rtt}, {w:?}: far-link round trips, {name} in B's column"),
                Some(f(&m.d, &rt)),
                Some(f(v, &rt)),
                None,
                "info",
                None,
            );
        }
    }
}
