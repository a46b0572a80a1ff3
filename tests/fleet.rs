//! A fleet: three popbridge nodes with their own state directories behind a real HAProxy
//! (`deploy/haproxy.cfg` as shipped, with loopback addresses: TCP mode, send-proxy-v2, health
//! checks on each node's `/readyz`), in front of one private Dovecot with METADATA. Real
//! clients and a ledger-checked load go through HAProxy's ports:
//!
//! - sessions spread over every node, and every node serves the same UIDLs, hidden set and
//!   migrated legacy UIDLs, also after one node's state directory is wiped mid-run;
//! - node loss: SIGKILL under load; HAProxy takes the node out within a measured bound, cut
//!   clients reconnect and go on, and the ledger shows no committed deletion lost and no
//!   uncommitted one applied;
//! - a rolling restart (SIGTERM, lame duck, drain, restart, node after node) under load fails
//!   no new session, with HAProxy's retries and redispatch off;
//! - throughput through the fleet against one node directly, with CPU per session.
//!
//! node3 runs the binary of the Debian package (cargo-deb, unpacked into a private root).
//!
//! One user on two nodes at once is tests/one_user_two_nodes.rs.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::deb::DebPackage;
use support::haproxy::Haproxy;
use support::imap_raw::Imap;
use support::ledger::{ledger_message, seed_from_env, upstream_view, Rng};
use support::prometheus::http_get;
use support::*;

const NODES: usize = 3;
const BACKENDS: [&str; 2] = ["popbridge_pop3", "popbridge_pop3s"];

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The shipped examples, made to run on loopback

/// What the test takes from `deploy/fleet-node.toml`, parsed by popbridge itself.
struct NodeExample {
    lame_duck_secs: u64,
    proxy_listeners: Vec<String>,
}

fn node_example() -> NodeExample {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    self_signed_cert(&cert, &key);
    let text = repo_file("deploy/fleet-node.toml")
        .replace("/etc/popbridge/pop3-cert.pem", &cert.display().to_string())
        .replace("/etc/popbridge/pop3-key.pem", &key.display().to_string());
    let config = popbridge::config::Config::parse(std::path::Path::new("fleet-node.toml"), &text)
        .unwrap_or_else(|e| panic!("deploy/fleet-node.toml: {e}"));
    NodeExample {
        lame_duck_secs: config.pop3.shutdown_lame_duck_secs,
        proxy_listeners: config.proxy_protocol.listeners,
    }
}

/// HAProxy's health check timing in `deploy/haproxy.cfg` (the `default-server` line).
#[derive(Debug, Clone, Copy)]
struct CheckTiming {
    inter: Duration,
    fastinter: Duration,
    fall: u32,
}

impl CheckTiming {
    /// The longest a node that stopped answering 200 keeps getting new sessions: up to one
    /// `inter` until its next check, then `fall - 1` more checks `fastinter` apart.
    fn detection_bound(&self) -> Duration {
        self.inter + self.fastinter * (self.fall - 1)
    }
}

fn check_timing(cfg: &str) -> CheckTiming {
    let line = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("default-server"))
        .expect("a default-server line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |k: &str| -> &str {
        let i = words
            .iter()
            .position(|w| *w == k)
            .unwrap_or_else(|| panic!("no {k}"));
        words[i + 1]
    };
    let dur = |v: &str| -> Duration {
        if let Some(ms) = v.strip_suffix("ms") {
            Duration::from_millis(ms.parse().unwrap())
        } else if let Some(s) = v.strip_suffix('s') {
            Duration::from_secs(s.parse().unwrap())
        } else {
            Duration::from_millis(v.parse().unwrap())
        }
    };
    CheckTiming {
        inter: dur(after("inter")),
        fastinter: dur(after("fastinter")),
        fall: after("fall").parse().unwrap(),
    }
}

/// Ports of one node: POP3, POP3S, metrics.
#[derive(Debug, Clone, Copy)]
struct NodePorts {
    pop3: u16,
    pop3s: u16,
    metrics: u16,
}

/// Ports HAProxy listens on.
#[derive(Debug, Clone, Copy)]
struct Front {
    pop3: u16,
    pop3s: u16,
    stats: u16,
}

/// `deploy/haproxy.cfg` with loopback addresses: only what cannot run here changes, and with
/// `retries_off` HAProxy's retries and redispatch. Panics if the example no longer has what the
/// test relies on.
fn haproxy_config(example: &str, front: Front, nodes: &[NodePorts], retries_off: bool) -> String {
    for must in [
        "mode tcp",
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "send-proxy-v2 check",
        "balance leastconn",
        "option redispatch",
    ] {
        assert!(example.contains(must), "deploy/haproxy.cfg lacks {must:?}");
    }
    let mut out = String::new();
    let mut replaced = BTreeMap::<&str, usize>::new();
    for line in example.lines() {
        let t = line.trim();
        let first = t.split_whitespace().next().unwrap_or("");
        let new = match first {
            "chroot" | "user" | "group" | "daemon" => None,
            "log" if t.starts_with("log /dev/log") => {
                Some("    log stdout format raw local0".into())
            }
            "stats" if t.starts_with("stats socket") => {
                Some("    stats socket {DIR}/admin.sock mode 600 level admin".into())
            }
            // Off: the rolling restart must lose nothing without them.
            "retries" if retries_off => Some("    retries 0".into()),
            "option" if retries_off && t == "option redispatch" => {
                Some("    no option redispatch".into())
            }
            "bind" => Some(match t {
                "bind :110" => format!("    bind 127.0.0.1:{}", front.pop3),
                "bind :995" => format!("    bind 127.0.0.1:{}", front.pop3s),
                _ if t.ends_with(":8405") => format!("    bind 127.0.0.1:{}", front.stats),
                other => panic!("unexpected bind line in deploy/haproxy.cfg: {other}"),
            }),
            "server" => {
                // server nodeN ADDR:PORT port METRICS
                let w: Vec<&str> = t.split_whitespace().collect();
                let n: usize = w[1]
                    .strip_prefix("node")
                    .and_then(|n| n.parse().ok())
                    .expect("servers are named nodeN");
                let node = nodes[n - 1];
                let port = match w[2].rsplit(':').next() {
                    Some("110") => node.pop3,
                    Some("995") => node.pop3s,
                    other => panic!("unexpected server port {other:?}"),
                };
                assert_eq!(&w[3..], ["port", "9110"], "server line: {t}");
                Some(format!(
                    "    server {} 127.0.0.1:{port} port {}",
                    w[1], node.metrics
                ))
            }
            _ => Some(line.to_string()),
        };
        if new.as_deref() != Some(line) {
            *replaced.entry(first).or_default() += 1;
        }
        if let Some(l) = new {
            out.push_str(&l);
            out.push('\n');
        }
    }
    let mut want: BTreeMap<&str, usize> = [
        ("bind", 3),
        ("chroot", 1),
        ("daemon", 1),
        ("group", 1),
        ("log", 1),
        ("server", 2 * NODES),
        ("stats", 1),
        ("user", 1),
    ]
    .into();
    if retries_off {
        want.insert("option", 1);
        want.insert("retries", 1);
    }
    assert_eq!(replaced, want, "deploy/haproxy.cfg changed shape");
    out
}

// ---------------------------------------------------------------------------------------------
// The fleet

struct Fleet {
    dc: Dovecot,
    nodes: Vec<Popbridge>,
    ports: Vec<NodePorts>,
    /// `deploy/haproxy.cfg` with retries and redispatch off: what most of the test runs through.
    lb: Haproxy,
    front: Front,
    /// `deploy/haproxy.cfg` as shipped (retries 2, redispatch), in front of the same nodes.
    shipped: Haproxy,
    shipped_front: Front,
    timing: CheckTiming,
    lame_duck: Duration,
    /// The Debian package node3 runs from (unpacked into a private root).
    _package: DebPackage,
}

impl Fleet {
    fn start(dc: Dovecot) -> Fleet {
        let example = node_example();
        let haproxy_example = repo_file("deploy/haproxy.cfg");
        let timing = check_timing(&haproxy_example);
        let lame_duck = Duration::from_secs(example.lame_duck_secs);
        assert!(
            lame_duck > timing.detection_bound() * 2,
            "deploy/fleet-node.toml's lame duck ({lame_duck:?}) is not well above HAProxy's \
             detection time ({:?})",
            timing.detection_bound()
        );
        let listeners: Vec<String> = example
            .proxy_listeners
            .iter()
            .map(|l| format!("\"{l}\""))
            .collect();
        // The last node runs the binary of the Debian package built from this tree.
        let package = DebPackage::build(std::path::Path::new(POPBRIDGE_BIN));
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for n in 0..NODES {
            let p = free_ports(2);
            let bin = if n == NODES - 1 {
                package.bin()
            } else {
                POPBRIDGE_BIN.into()
            };
            // Each node: its own temp dir, hence its own state directory.
            let node = Popbridge::start_bin(
                &bin,
                &dc,
                &format!(
                    "[pop3]\nlisten_tls = \"127.0.0.1:{}\"\nshutdown_lame_duck_secs = {}\n\
                     shutdown_drain_secs = 5\n\
                     [pop3.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                     [metrics]\nlisten = \"127.0.0.1:{}\"\n\
                     [proxy_protocol]\nlisteners = [{}]\ntrusted_networks = [\"127.0.0.0/8\"]\n\
                     [limits]\nmax_connections_per_ip = 1000",
                    p[0],
                    example.lame_duck_secs,
                    dc.dir().join("server.pem").display(),
                    dc.dir().join("server.key").display(),
                    p[1],
                    listeners.join(", "),
                ),
            );
            ports.push(NodePorts {
                pop3: node.pop3_port(),
                pop3s: p[0],
                metrics: p[1],
            });
            nodes.push(node);
        }
        let f = free_ports(6);
        let front = Front {
            pop3: f[0],
            pop3s: f[1],
            stats: f[2],
        };
        let shipped_front = Front {
            pop3: f[3],
            pop3s: f[4],
            stats: f[5],
        };
        let cfg = haproxy_config(&haproxy_example, front, &ports, true);
        let lb = Haproxy::start(&cfg, &[front.pop3, front.pop3s, front.stats]);
        let cfg = haproxy_config(&haproxy_example, shipped_front, &ports, false);
        let shipped = Haproxy::start(&cfg, &[shipped_front.pop3]);
        let fleet = Fleet {
            dc,
            nodes,
            ports,
            lb,
            front,
            shipped,
            shipped_front,
            timing,
            lame_duck,
            _package: package,
        };
        for n in 0..NODES {
            fleet.wait_up(n, Duration::from_secs(15));
        }
        fleet
    }

    fn name(n: usize) -> String {
        format!("node{}", n + 1)
    }

    /// Waits until both HAProxies have node `n` UP in both backends; how long that took.
    fn wait_up(&self, n: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        for lb in [&self.lb, &self.shipped] {
            for b in BACKENDS {
                lb.wait_status(b, &Fleet::name(n), "UP", timeout);
            }
        }
        started.elapsed()
    }

    /// Kills node `n` under the load of `running`, through `lb`. Returns how long `lb` took to
    /// mark it DOWN in both backends; panics if it sent the node a session after that.
    fn lose_node(&mut self, n: usize, lb_shipped: bool) -> (Instant, Duration) {
        self.nodes[n].signal("KILL");
        let killed = Instant::now();
        let lb = if lb_shipped { &self.shipped } else { &self.lb };
        let mut detection = Duration::ZERO;
        for b in BACKENDS {
            detection =
                detection.max(lb.wait_status(b, &Fleet::name(n), "DOWN", Duration::from_secs(10)));
        }
        let sessions = |lb: &Haproxy| -> u64 {
            BACKENDS
                .iter()
                .map(|b| lb.server(b, &Fleet::name(n)).stot)
                .sum()
        };
        let after_down = sessions(lb);
        thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            sessions(lb),
            after_down,
            "HAProxy sent node{} new sessions after marking it DOWN",
            n + 1
        );
        (killed, detection)
    }

    /// Sessions HAProxy has sent to node `n` so far (both backends).
    fn lb_sessions(&self, n: usize) -> u64 {
        BACKENDS
            .iter()
            .map(|b| self.lb.server(b, &Fleet::name(n)).stot)
            .sum()
    }

    /// `popbridge_sessions_started_total` of node `n`'s process (all listeners).
    fn node_sessions(&self, n: usize) -> f64 {
        let (_, body) = http_get(self.ports[n].metrics, "/metrics").expect("GET /metrics");
        body.lines()
            .filter(|l| l.starts_with("popbridge_sessions_started_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// CPU time (user + system) of process `pid` so far.
    fn cpu(pid: u32) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 1000 / clock_ticks())
    }

    /// Context switches of all threads of all nodes so far.
    fn nodes_switches(&self) -> u64 {
        let mut total = 0;
        for n in &self.nodes {
            let tasks = std::fs::read_dir(format!("/proc/{}/task", n.pid())).unwrap();
            for task in tasks.flatten() {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                total += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        total
    }

    /// CPU time of all nodes together.
    fn nodes_cpu(&self) -> Duration {
        self.nodes.iter().map(|n| Fleet::cpu(n.pid())).sum()
    }
}

fn clock_ticks() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// The UIDL listing (`n uidl` pairs' UIDLs) of `user` on one node directly, with curl sending
/// the PROXY header HAProxy would (`--haproxy-protocol`).
fn node_uidls(port: u16, user: &str, pw: &str) -> Vec<String> {
    let r = curl_pop3(
        &format!("pop3://{user}:{pw}@127.0.0.1:{port}/"),
        &["--haproxy-protocol", "-X", "UIDL"],
    );
    assert_eq!(r.code, 0, "curl UIDL {user} on :{port}: {}", r.stderr);
    String::from_utf8_lossy(&r.stdout)
        .lines()
        // curl prints an empty listing as one empty line.
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or_else(|| {
                    panic!(
                        "not `n uidl`: {l:?} in {:?}; {}",
                        String::from_utf8_lossy(&r.stdout),
                        r.stderr
                    )
                })
                .to_string()
        })
        .collect()
}

/// RETR `n` of `user` on one node directly, with curl.
fn node_retr(port: u16, user: &str, pw: &str, n: usize) -> Vec<u8> {
    let r = curl_pop3(
        &format!("pop3://{user}:{pw}@127.0.0.1:{port}/{n}"),
        &["--haproxy-protocol"],
    );
    assert_eq!(r.code, 0, "curl RETR {n} {user} on :{port}: {}", r.stderr);
    r.stdout
}

// ---------------------------------------------------------------------------------------------
// The ledger-checked load through HAProxy

const LOAD_USERS: usize = 3;
const CLIENTS_PER_USER: usize = 2;
const SEEDED_PER_USER: usize = 150;
/// New mail appended over IMAP before each load phase, per user.
const APPENDED_PER_PHASE: usize = 10;

fn load_user(u: usize) -> String {
    format!("load{u}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// QUIT answered +OK: every mark must be applied.
    Committed,
    /// Ended without QUIT: no mark may be.
    Uncommitted,
    /// QUIT sent, no answer (the node died): each mark applied or not.
    InDoubt,
}

#[derive(Debug)]
struct Record {
    user: usize,
    marked: Vec<u32>,
    end: End,
    /// The connection died under it.
    cut: bool,
}

/// What the load clients share.
#[derive(Default)]
struct Load {
    records: Mutex<Vec<Record>>,
    /// Per user: UIDs hidden by a committed QUIT; no session logging in later may list them.
    committed_hidden: Mutex<Vec<HashSet<u32>>>,
    /// Per user: UID -> ledger marker.
    markers: Mutex<Vec<BTreeMap<u32, String>>>,
    uidvalidity: Mutex<Vec<u32>>,
    errors: Mutex<Vec<String>>,
    /// New sessions that got no greeting (refused, or closed by the balancer), with when.
    failed: Mutex<Vec<Instant>>,
    /// Sessions that logged in.
    sessions: AtomicU64,
    retrieved: AtomicU64,
    in_use: AtomicU64,
    /// Sessions cut by a dying node, and how many of their clients then got in again.
    cut: AtomicU64,
    recovered: AtomicU64,
}

struct Pop {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Pop {
    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(l)
    }
    fn cmd(&mut self, c: &str) -> io::Result<String> {
        self.w.write_all(format!("{c}\r\n").as_bytes())?;
        self.line()
    }
    fn multi(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            let l = self.line()?;
            if l == ".\r\n" {
                return Ok(out);
            }
            out.push(l);
        }
    }
}

/// A new connection to `port`, with a PROXY v1 header first when `proxy` (straight to a node),
/// up to its greeting. `None` when there is no greeting: a failed new session.
fn connect(port: u16, proxy: bool) -> Option<Pop> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let _ = s.set_nodelay(true);
    let mut p = Pop {
        r: BufReader::new(s.try_clone().ok()?),
        w: s,
    };
    if proxy {
        let local = p.w.local_addr().ok()?.port();
        p.w.write_all(format!("PROXY TCP4 127.0.0.1 127.0.0.1 {local} {port}\r\n").as_bytes())
            .ok()?;
    }
    match p.line() {
        Ok(l) if l.starts_with("+OK") => Some(p),
        _ => None,
    }
}

enum Attempt {
    Failed,
    InUse,
    Session(Record),
}

/// One session of load user `user` through `port`: UIDL (checked), a few RETRs (checked
/// against the ledger), some DELEs, then QUIT, RSET+QUIT or a dropped connection.
fn load_session(port: u16, user: usize, rng: &mut Rng, load: &Load) -> Attempt {
    let name = load_user(user);
    let Some(mut p) = connect(port, false) else {
        return Attempt::Failed;
    };
    let hidden_before = load.committed_hidden.lock().unwrap()[user].clone();
    let login = (|| -> io::Result<String> {
        let u = p.cmd(&format!("USER {name}"))?;
        if !u.starts_with("+OK") {
            return Ok(u);
        }
        p.cmd("PASS pw")
    })();
    let pass = match login {
        Ok(l) => l,
        // Greeted, then cut before the login was answered: the node died.
        Err(_) => {
            return Attempt::Session(Record {
                user,
                marked: Vec::new(),
                end: End::Uncommitted,
                cut: true,
            })
        }
    };
    if pass.starts_with("-ERR [IN-USE]") {
        load.in_use.fetch_add(1, Ordering::Relaxed);
        let _ = p.cmd("QUIT");
        return Attempt::InUse;
    }
    if !pass.starts_with("+OK") {
        load.errors
            .lock()
            .unwrap()
            .push(format!("{name} PASS: {pass}"));
        return Attempt::Failed;
    }
    load.sessions.fetch_add(1, Ordering::Relaxed);
    let mut rec = Record {
        user,
        marked: Vec::new(),
        end: End::Uncommitted,
        cut: false,
    };
    let err = |m: String| load.errors.lock().unwrap().push(m);
    let uv = load.uidvalidity.lock().unwrap()[user];
    let run = |p: &mut Pop, rec: &mut Record, rng: &mut Rng| -> io::Result<()> {
        if !p.cmd("UIDL")?.starts_with("+OK") {
            err(format!("{name}: UIDL refused"));
            return Ok(());
        }
        let mut listing: Vec<(usize, u32)> = Vec::new();
        for l in p.multi()? {
            let mut f = l.split_whitespace();
            let (n, uidl) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            let uid = u32::from_str_radix(uidl.get(..8).unwrap_or(""), 16).unwrap_or(0);
            if uidl != format!("{uid:08x}{uv:08x}") {
                err(format!("{name}: UIDL {uidl} is not the UID's (uid {uid})"));
            }
            if hidden_before.contains(&uid) {
                err(format!("{name}: UID {uid} listed after a committed DELE"));
            }
            listing.push((n.parse().unwrap_or(0), uid));
        }
        for _ in 0..rng.below(3) + 1 {
            if listing.is_empty() {
                break;
            }
            let (n, uid) = listing[rng.below(listing.len() as u64) as usize];
            if !p.cmd(&format!("RETR {n}"))?.starts_with("+OK") {
                err(format!("{name}: RETR {n} refused"));
                continue;
            }
            let body = p.multi()?.concat();
            let want = load.markers.lock().unwrap()[user].get(&uid).cloned();
            match want {
                Some(m) if body.contains(&format!("X-Ledger: {m}\r\n")) => {
                    load.retrieved.fetch_add(1, Ordering::Relaxed);
                }
                _ => err(format!("{name}: RETR of UID {uid} is not its ledger entry")),
            }
        }
        // Few deletions: the mailbox must last the whole run.
        if rng.below(10) < 2 && !listing.is_empty() {
            let (n, uid) = listing[rng.below(listing.len() as u64) as usize];
            if !p.cmd(&format!("DELE {n}"))?.starts_with("+OK") {
                err(format!("{name}: DELE {n} refused"));
            } else {
                rec.marked.push(uid);
            }
        }
        match rng.below(100) {
            0..=14 => return Ok(()), // dropped: no QUIT
            15..=29 => {
                if !p.cmd("RSET")?.starts_with("+OK") {
                    err(format!("{name}: RSET refused"));
                }
                rec.marked.clear();
            }
            _ => {}
        }
        rec.end = End::InDoubt;
        let q = p.cmd("QUIT")?;
        if q.starts_with("+OK") {
            rec.end = End::Committed;
            load.committed_hidden.lock().unwrap()[user].extend(rec.marked.iter().copied());
        } else {
            err(format!("{name}: QUIT: {q}"));
        }
        Ok(())
    };
    rec.cut = run(&mut p, &mut rec, rng).is_err();
    Attempt::Session(rec)
}

/// Load clients running through `port` until dropped.
struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Running {
    fn start(port: u16, load: &Arc<Load>, seed: u64, phase: u64) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for u in 0..LOAD_USERS {
            for c in 0..CLIENTS_PER_USER {
                let (stop, load) = (stop.clone(), load.clone());
                let mut rng = Rng::new(seed ^ (phase * 1000 + (u * 10 + c) as u64 + 1));
                threads.push(thread::spawn(move || {
                    let mut was_cut = false;
                    while !stop.load(Ordering::Relaxed) {
                        match load_session(port, u, &mut rng, &load) {
                            Attempt::Failed => {
                                load.failed.lock().unwrap().push(Instant::now());
                                // A real client tries again a little later.
                                thread::sleep(Duration::from_millis(50));
                            }
                            Attempt::InUse => {}
                            Attempt::Session(rec) => {
                                if rec.cut {
                                    load.cut.fetch_add(1, Ordering::Relaxed);
                                    was_cut = true;
                                } else if was_cut {
                                    // Reconnected (to another node) and went on.
                                    load.recovered.fetch_add(1, Ordering::Relaxed);
                                    was_cut = false;
                                }
                                load.records.lock().unwrap().push(rec);
                            }
                        }
                        // A little think time: the machine has two cores for everything.
                        thread::sleep(Duration::from_millis(5));
                    }
                }));
            }
        }
        Running { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load client panicked");
        }
    }
}

/// New mail for every load user, appended over IMAP and entered in the ledger.
fn new_mail(fleet: &Fleet, load: &Load, appended: &mut [usize]) {
    for (u, next) in appended.iter_mut().enumerate() {
        let name = load_user(u);
        let mut c = Imap::login(fleet.dc.imap_port(), &name, "pw");
        for _ in 0..APPENDED_PER_PHASE {
            c.run("APPEND INBOX", &ledger_message(&name, *next));
            *next += 1;
        }
        let (_, view) = upstream_view(fleet.dc.imap_port(), &name, "pw", "INBOX");
        let mut markers = load.markers.lock().unwrap();
        for (&uid, m) in &view {
            let known = markers[u].entry(uid).or_insert_with(|| m.marker.clone());
            assert_eq!(known, &m.marker, "{name}: UID {uid} changed");
        }
    }
}

/// The ledger check after a phase: nothing lost upstream, every committed DELE applied, no
/// uncommitted one; then every node (straight, by curl) lists exactly the visible mail under
/// the same UIDLs. Returns the phase's (sessions, committed, uncommitted, in doubt, cut).
fn check_ledger(fleet: &Fleet, load: &Load, phase: &str) -> [usize; 5] {
    let records: Vec<Record> = std::mem::take(&mut *load.records.lock().unwrap());
    let mut counts = [records.len(), 0, 0, 0, 0];
    for r in &records {
        counts[1 + r.end as usize] += 1;
        counts[4] += usize::from(r.cut);
    }
    for u in 0..LOAD_USERS {
        let name = load_user(u);
        let (uv, view) = upstream_view(fleet.dc.imap_port(), &name, "pw", "INBOX");
        assert_eq!(
            uv,
            load.uidvalidity.lock().unwrap()[u],
            "UIDVALIDITY changed"
        );
        let markers = load.markers.lock().unwrap()[u].clone();
        assert_eq!(
            view.len(),
            markers.len(),
            "{phase}: {name}: mail lost or added"
        );
        for (uid, m) in &view {
            assert_eq!(
                markers.get(uid),
                Some(&m.marker),
                "{phase}: {name}: UID {uid}"
            );
        }
        let hidden: HashSet<u32> = view
            .iter()
            .filter(|(_, m)| m.hidden)
            .map(|(&uid, _)| uid)
            .collect();
        let (mut must, mut may) = (HashSet::new(), HashSet::new());
        for r in records.iter().filter(|r| r.user == u) {
            match r.end {
                End::Committed => must.extend(r.marked.iter().copied()),
                End::InDoubt => may.extend(r.marked.iter().copied()),
                End::Uncommitted => {}
            }
        }
        let missing: Vec<_> = must.difference(&hidden).collect();
        assert!(
            missing.is_empty(),
            "{phase}: {name}: committed DELE of UIDs {missing:?} not applied"
        );
        let mut accounted = load.committed_hidden.lock().unwrap()[u].clone();
        accounted.extend(may.iter().copied());
        let stray: Vec<_> = hidden.difference(&accounted).collect();
        assert!(
            stray.is_empty(),
            "{phase}: {name}: UIDs {stray:?} hidden without a QUIT"
        );
        load.committed_hidden.lock().unwrap()[u].extend(hidden.iter().copied());
        let expected: Vec<String> = view
            .iter()
            .filter(|(_, m)| !m.hidden)
            .map(|(&uid, _)| format!("{uid:08x}{uv:08x}"))
            .collect();
        for (n, p) in fleet.ports.iter().enumerate() {
            assert_eq!(
                node_uidls(p.pop3, &name, "pw"),
                expected,
                "{phase}: {name}: node{} lists other mail than upstream shows",
                n + 1
            );
        }
    }
    let errors = std::mem::take(&mut *load.errors.lock().unwrap());
    assert!(errors.is_empty(), "{phase}: protocol errors: {errors:#?}");
    counts
}

/// `mig`'s mailbox: five messages, the first three with UIDLs migrated from a legacy server.
const MIG_MESSAGES: usize = 5;

fn mig_expected(uv: u32) -> Vec<String> {
    (1..=MIG_MESSAGES as u32)
        .map(|uid| {
            if uid <= 3 {
                format!("OLD-{uid}")
            } else {
                format!("{uid:08x}{uv:08x}")
            }
        })
        .collect()
}

/// Every node serves `mig` its migrated UIDLs, and the same bytes.
fn check_migrated(fleet: &Fleet, phase: &str) {
    let uv = fleet.dc.imap_state("mig", "migpw", "INBOX").uidvalidity;
    let want = mig_expected(uv);
    let mut bytes = Vec::new();
    for (n, p) in fleet.ports.iter().enumerate() {
        assert_eq!(
            node_uidls(p.pop3, "mig", "migpw"),
            want,
            "{phase}: node{} serves other legacy UIDLs",
            n + 1
        );
        bytes.push(node_retr(p.pop3, "mig", "migpw", 2));
    }
    assert!(
        bytes.windows(2).all(|w| w[0] == w[1]),
        "{phase}: RETR differs between nodes"
    );
}

// ---------------------------------------------------------------------------------------------
// Throughput: one node directly against the fleet through HAProxy

const TP_USERS: usize = 4;

fn tp_session(port: u16, proxy: bool, user: &str) -> Result<(), String> {
    let mut p = connect(port, proxy).ok_or("no greeting")?;
    let mut step = |c: &str, multi: bool| -> Result<(), String> {
        let l = p.cmd(c).map_err(|e| format!("{c}: {e}"))?;
        if !l.starts_with("+OK") {
            return Err(format!("{c}: {l}"));
        }
        if multi {
            p.multi().map_err(|e| format!("{c}: {e}"))?;
        }
        Ok(())
    };
    step(&format!("USER {user}"), false)?;
    step("PASS pw", false)?;
    step("UIDL", true)?;
    step("RETR 1", true)?;
    step("RETR 2", true)?;
    step("QUIT", false)
}

/// Sessions in `secs` and the time they took: one client thread per user, client `u` connecting
/// to `ports[u % ports.len()]`.
fn throughput(ports: &[u16], proxy: bool, secs: Duration) -> (u64, Duration) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let deadline = started + secs;
    let threads: Vec<_> = (0..TP_USERS)
        .map(|u| {
            let (done, errors) = (done.clone(), errors.clone());
            let port = ports[u % ports.len()];
            thread::spawn(move || {
                while Instant::now() < deadline {
                    match tp_session(port, proxy, &format!("tp{u}")) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "throughput sessions failed: {errors:?}");
    (done.load(Ordering::Relaxed), started.elapsed())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_fleet_behind_haproxy_loses_nothing_to_node_loss_wipes_and_rolling_restarts() {
    let test_started = Instant::now();
    let seed = seed_from_env("FLEET_SEED");
    eprintln!("fleet: seed {seed} (rerun with FLEET_SEED={seed})");

    let dc = Dovecot::start();
    for u in 0..LOAD_USERS {
        let name = load_user(u);
        dc.add_user(&name, "pw");
        let msgs: Vec<Vec<u8>> = (0..SEEDED_PER_USER)
            .map(|n| ledger_message(&name, n))
            .collect();
        dc.seed(&name, &msgs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }
    dc.add_user("mig", "migpw");
    let mig: Vec<Vec<u8>> = (0..MIG_MESSAGES)
        .map(|n| ledger_message("mig", n))
        .collect();
    dc.seed("mig", &mig.iter().map(Vec::as_slice).collect::<Vec<_>>());
    for u in 0..TP_USERS {
        let name = format!("tp{u}");
        dc.add_user(&name, "pw");
        let msgs: Vec<Vec<u8>> = (0..10).map(|n| ledger_message(&name, n)).collect();
        dc.seed(&name, &msgs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }
    let mut fleet = Fleet::start(dc);
    let setup = test_started.elapsed();
    let front = fleet.front.pop3;

    // Legacy UIDLs migrated while the fleet runs, with node1's configuration: its state
    // directory is in use, so the map goes to METADATA only, which every node reads.
    let map = fleet.nodes[0].dir().join("mig.map");
    std::fs::write(&map, "mig 1 OLD-1\nmig 2 OLD-2\nmig 3 OLD-3\n").unwrap();
    let out = std::process::Command::new(POPBRIDGE_BIN)
        .args(["migrate", "import", "--config"])
        .arg(fleet.nodes[0].config_path())
        .args(["--to", "imap", "--password-env", "MIG_PW", "--file"])
        .arg(&map)
        .env("MIG_PW", "migpw")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("stored metadata; ok"), "{said}");

    let load = Arc::new(Load::default());
    {
        let mut hidden = load.committed_hidden.lock().unwrap();
        let mut markers = load.markers.lock().unwrap();
        let mut uvs = load.uidvalidity.lock().unwrap();
        for u in 0..LOAD_USERS {
            let (uv, view) = upstream_view(fleet.dc.imap_port(), &load_user(u), "pw", "INBOX");
            assert_eq!(view.len(), SEEDED_PER_USER);
            hidden.push(HashSet::new());
            markers.push(
                view.iter()
                    .map(|(&uid, m)| (uid, m.marker.clone()))
                    .collect(),
            );
            uvs.push(uv);
        }
    }

    let mut appended = [SEEDED_PER_USER; LOAD_USERS];

    // 1. Spread: load and real clients (poplib, curl, POP3 and POP3S) through HAProxy.
    new_mail(&fleet, &load, &mut appended);
    let lb_before: Vec<u64> = (0..NODES).map(|n| fleet.lb_sessions(n)).collect();
    let running = Running::start(front, &load, seed, 1);
    let uv_mig = fleet.dc.imap_state("mig", "migpw", "INBOX").uidvalidity;
    for _ in 0..3 {
        let s = poplib(front, &["user mig", "pass migpw", "uidl", "quit"]);
        s.assert_all_ok();
        let uidls: Vec<String> = String::from_utf8(s.step("uidl").data())
            .unwrap()
            .lines()
            .map(|l| l.split(' ').nth(1).unwrap().to_string())
            .collect();
        assert_eq!(
            uidls,
            mig_expected(uv_mig),
            "migrated UIDLs through HAProxy"
        );
    }
    let ca = fleet.dc.ca_pem_path().display().to_string();
    for _ in 0..2 {
        let r = curl_pop3(
            &format!("pop3s://mig:migpw@127.0.0.1:{}/2", fleet.front.pop3s),
            &["--cacert", &ca],
        );
        assert_eq!(r.code, 0, "POP3S through HAProxy: {}", r.stderr);
        assert_eq!(r.stdout, node_retr(fleet.ports[0].pop3, "mig", "migpw", 2));
    }
    thread::sleep(Duration::from_secs(3));

    // 2. Wipe node2's state directory mid-run: its cache is gone, nothing any client sees
    // changes (the load keeps checking; node2 restarts on the empty directory in the roll).
    let state2 = fleet.nodes[1].state_dir();
    for entry in std::fs::read_dir(&state2).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    thread::sleep(Duration::from_secs(2));
    running.stop();
    let spread: Vec<u64> = (0..NODES)
        .map(|n| fleet.lb_sessions(n) - lb_before[n])
        .collect();
    let node_counts: Vec<f64> = (0..NODES).map(|n| fleet.node_sessions(n)).collect();
    assert!(
        spread.iter().all(|&c| c > 0) && node_counts.iter().all(|&c| c > 0.0),
        "sessions did not reach every node: HAProxy {spread:?}, popbridge {node_counts:?}"
    );
    let phase1 = check_ledger(&fleet, &load, "spread and wipe");
    check_migrated(&fleet, "spread and wipe");
    let (_, stats_body) = http_get(fleet.front.stats, "/metrics").expect("HAProxy /metrics");
    assert!(
        stats_body.contains("haproxy_backend_active_servers{proxy=\"popbridge_pop3\"} 3"),
        "HAProxy's Prometheus exporter does not see three nodes"
    );

    // 3. Node loss: SIGKILL node3 under load, through HAProxy with retries and redispatch off.
    new_mail(&fleet, &load, &mut appended);
    let running = Running::start(front, &load, seed, 3);
    thread::sleep(Duration::from_millis(1500));
    let cut_before = load.cut.load(Ordering::Relaxed);
    let failed_before = load.failed.lock().unwrap().len();
    let (killed, detection) = fleet.lose_node(2, false);
    running.stop();
    let failed_loss: Vec<Instant> = load.failed.lock().unwrap()[failed_before..].to_vec();
    let last_failure = failed_loss
        .iter()
        .max()
        .map(|t| t.saturating_duration_since(killed));
    assert!(
        failed_loss
            .iter()
            .all(|t| *t <= killed + detection + Duration::from_millis(500)),
        "new sessions failed after node3 was DOWN: {last_failure:?} after the kill, DOWN after {detection:?}"
    );
    let cut_loss = load.cut.load(Ordering::Relaxed) - cut_before;
    assert!(
        detection <= fleet.timing.detection_bound() + Duration::from_millis(700),
        "node3 DOWN after {detection:?}, bound {:?}",
        fleet.timing.detection_bound()
    );
    fleet.nodes[2].restart();
    let back_up = fleet.wait_up(2, Duration::from_secs(15));
    let phase3 = check_ledger(&fleet, &load, "node loss");
    let recovered = load.recovered.load(Ordering::Relaxed);

    // The same through HAProxy as shipped (retries 2, redispatch): node2 this time.
    new_mail(&fleet, &load, &mut appended);
    let running = Running::start(fleet.shipped_front.pop3, &load, seed, 5);
    thread::sleep(Duration::from_millis(1500));
    let cut_before = load.cut.load(Ordering::Relaxed);
    let failed_before = load.failed.lock().unwrap().len();
    let (killed_shipped, detection_shipped) = fleet.lose_node(1, true);
    running.stop();
    let failed_shipped: Vec<Duration> = load.failed.lock().unwrap()[failed_before..]
        .iter()
        .map(|t| t.saturating_duration_since(killed_shipped))
        .collect();
    let cut_shipped = load.cut.load(Ordering::Relaxed) - cut_before;
    fleet.nodes[1].restart();
    fleet.wait_up(1, Duration::from_secs(15));
    let phase3b = check_ledger(&fleet, &load, "node loss, shipped HAProxy");
    // Retries and redispatch save every connection the dead node refuses. What they cannot
    // save is a connection the node had accepted when it died, before its greeting: at most
    // one per client, at the moment of the kill, never later in the detection window.
    assert!(
        failed_shipped.len() <= LOAD_USERS * CLIENTS_PER_USER
            && failed_shipped
                .iter()
                .all(|d| *d < Duration::from_millis(300)),
        "new sessions failed through the shipped HAProxy configuration (retries, redispatch): \
         {failed_shipped:?} after the kill"
    );

    // 4. Rolling restart under load: each node in turn SIGTERM, lame duck, drain, restart.
    new_mail(&fleet, &load, &mut appended);
    let failed_before = load.failed.lock().unwrap().len();
    let cut_before = load.cut.load(Ordering::Relaxed);
    let running = Running::start(front, &load, seed, 4);
    let roll_started = Instant::now();
    let mut rolls = Vec::new();
    for n in 0..NODES {
        let t = Instant::now();
        fleet.nodes[n].signal("TERM");
        let status = fleet.nodes[n]
            .wait_exit(fleet.lame_duck + Duration::from_secs(10))
            .unwrap_or_else(|| panic!("node{} did not stop", n + 1));
        assert!(status.success(), "node{}: {status}", n + 1);
        let stopped = t.elapsed();
        fleet.nodes[n].restart();
        let up = fleet.wait_up(n, Duration::from_secs(15));
        rolls.push((stopped, up));
        // A moment on the full fleet before the next node goes.
        thread::sleep(Duration::from_millis(300));
    }
    let roll = roll_started.elapsed();
    running.stop();
    let failed_roll = load.failed.lock().unwrap().len() - failed_before;
    let cut_roll = load.cut.load(Ordering::Relaxed) - cut_before;
    let phase4 = check_ledger(&fleet, &load, "rolling restart");
    assert_eq!(
        failed_roll, 0,
        "new sessions failed during the rolling restart"
    );
    assert_eq!(cut_roll, 0, "sessions were cut during the rolling restart");
    // node2 came back on its wiped state directory and serves the same as the others.
    check_migrated(&fleet, "after the roll");
    for n in 0..NODES {
        assert!(
            fleet.nodes[n].log().contains("stopping: lame duck"),
            "node{} had no lame duck phase",
            n + 1
        );
    }

    // 5. Throughput and CPU per session: one node directly, the three nodes directly (each
    // client sticking to one), and the three through HAProxy.
    let secs = Duration::from_secs(2);
    // Sessions per second, popbridge CPU per session (all three nodes, in every run: the idle
    // ones' background work, health checks and cache flushes, is part of a fleet's cost) and
    // HAProxy's CPU per session, in ms.
    // Also context switches per session, all nodes' threads.
    let measure = |ports: &[u16], proxy: bool| -> (f64, f64, f64, f64) {
        let (cpu0, lb0) = (fleet.nodes_cpu(), Fleet::cpu(fleet.lb.pid()));
        let switches0 = fleet.nodes_switches();
        let (n, t) = throughput(ports, proxy, secs);
        let (cpu, lb) = (fleet.nodes_cpu() - cpu0, Fleet::cpu(fleet.lb.pid()) - lb0);
        let switches = (fleet.nodes_switches() - switches0) as f64 / n as f64;
        let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
        (n as f64 / t.as_secs_f64(), per(cpu), per(lb), switches)
    };
    let node_ports: Vec<u16> = fleet.ports.iter().map(|p| p.pop3).collect();
    let (mut direct, mut spread_direct, mut through) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        direct.push(measure(&node_ports[..1], true));
        spread_direct.push(measure(&node_ports, true));
        through.push(measure(&[front], false));
    }
    type Run = (f64, f64, f64, f64);
    let best = |runs: &[Run]| runs.iter().map(|r| r.0).fold(0.0, f64::max);
    let mean =
        |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    let (best_direct, best_fleet) = (best(&direct), best(&through));
    let ratio = best_fleet / best_direct;
    let cpu_direct = mean(&direct, |r| r.1);
    let cpu_spread = mean(&spread_direct, |r| r.1);
    let cpu_fleet = mean(&through, |r| r.1);
    let cpu_lb = mean(&through, |r| r.2);
    let switches = [
        mean(&direct, |r| r.3),
        mean(&spread_direct, |r| r.3),
        mean(&through, |r| r.3),
    ];

    report(&format!(
        "fleet (seed {seed}): setup {setup:.1?} (node3 from the Debian package); spread over nodes (HAProxy sessions) {spread:?}, \
         popbridge sessions started {node_counts:?}; phases [sessions, committed, uncommitted, \
         in doubt, cut]: spread+wipe {phase1:?}, node loss {phase3:?}, node loss behind the shipped \
         HAProxy {phase3b:?}, roll {phase4:?}; \
         RETRs checked {}, IN-USE refusals {}"
        ,
        load.retrieved.load(Ordering::Relaxed),
        load.in_use.load(Ordering::Relaxed),
    ));
    report(&format!(
        "fleet node loss: node3 DOWN in HAProxy {:.0} ms after SIGKILL (bound inter+fastinter*(fall-1) = {:?}); \
         {} connection attempts failed meanwhile (last {:?} after the kill; retries/redispatch off, \
         clients retry after 50 ms), {cut_loss} sessions cut, {recovered} cut clients reconnected and went on; \
         no session sent to node3 once DOWN; back UP {:.1?} after restart. Behind HAProxy as shipped \
         (retries 2, redispatch): node2 DOWN after {:.0} ms, {} failed attempts (at {failed_shipped:.0?} after the kill: \
         connections the node had accepted), {cut_shipped} sessions cut",
        detection.as_secs_f64() * 1000.0,
        fleet.timing.detection_bound(),
        failed_loss.len(),
        last_failure,
        back_up,
        detection_shipped.as_secs_f64() * 1000.0,
        failed_shipped.len(),
    ));
    report(&format!(
        "fleet rolling restart: {roll:.1?} for {NODES} nodes (lame duck {:?}; per node stop, back UP: {rolls:.1?}); \
         failed new sessions {failed_roll}, cut sessions {cut_roll}",
        fleet.lame_duck,
    ));
    report(&format!(
        "fleet throughput ({TP_USERS} clients, UIDL+2 RETR per session, best of 2): one node directly \
         {best_direct:.0} sessions/s, {NODES} nodes directly {:.0}/s, {NODES} nodes through HAProxy \
         {best_fleet:.0}/s (ratio to one node {ratio:.2}); popbridge CPU per session (all nodes' CPU in \
         every run) {cpu_direct:.2} ms one node, {cpu_spread:.2} ms three nodes directly, {cpu_fleet:.2} ms \
         through HAProxy, plus HAProxy's {cpu_lb:.2} ms; context switches per session in popbridge \
         {switches:.1?}; runs (sessions/s, ms, HAProxy ms, switches) \
         {direct:.1?} / {spread_direct:.1?} / {through:.1?}; whole test {:.1?}",
        best(&spread_direct),
        test_started.elapsed(),
    ));
    assert!(
        recovered > 0 || cut_loss == 0,
        "cut clients never got back in"
    );
    // Measured 0.79 to 1.11 on a shared two-core machine: HAProxy's own CPU comes out of the same
    // two cores, and closed-loop clients feel its extra hop. Something serialising sessions
    // across nodes would show as three nodes directly falling behind one node; the bound only
    // keeps a busy machine from failing the suite.
    assert!(
        ratio > 0.6,
        "throughput through the fleet {best_fleet:.0}/s against {best_direct:.0}/s directly"
    );
    assert!(
        cpu_fleet < cpu_direct * 2.0 + 0.2,
        "popbridge CPU per session {cpu_fleet:.2} ms through HAProxy against {cpu_direct:.2} ms"
    );
}
