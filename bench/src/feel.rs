//! Options and shared pieces of the scenarios where users feel performance (issue 17): `wan`
//! (a distant IMAP store, [`crate::wan`]), `polls` (mostly-empty polls, [`crate::polls`]) and
//! `previews` (`TOP n 0` on every message, [`crate::previews`]).

use clap::{Args, ValueEnum};

/// A `wan` workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// The 2,000 mixed messages of `throughput` (1 KB - 1 MB), RETR each.
    Mixed,
    /// 2,000 messages of 2-8 KB, RETR each.
    Small,
    /// The 100,000-message listing: STAT, UIDL, LIST.
    Huge,
    /// One 50 MB message.
    Big,
}

/// Another POP3 proxy measured in popbridge's place in `wan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// nginx's mail proxy.
    Nginx,
    /// perdition.
    Perdition,
}

impl Peer {
    pub fn kind(self) -> popbridge_testkit::pop3_proxy::ProxyKind {
        use popbridge_testkit::pop3_proxy::ProxyKind;
        match self {
            Peer::Nginx => ProxyKind::Nginx,
            Peer::Perdition => ProxyKind::Perdition,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// wan: one-way delays in ms (a round trip costs twice), comma-separated
    /// [default: 5,12.5,25; 1 with --smoke].
    #[arg(long, value_delimiter = ',', value_name = "MS")]
    pub wan_delay: Vec<f64>,
    /// wan: workloads, comma-separated [default: all four].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub wan_workload: Vec<Workload>,
    /// wan: RETR only the first N messages of mixed and small (a short run).
    #[arg(long, value_name = "N")]
    pub wan_messages: Option<u64>,
    /// wan: measured sessions per side, workload and delay (default 1: D's 2,000 RETRs at
    /// 50 ms RTT alone take over 100 s).
    #[arg(long, value_name = "N")]
    pub wan_runs: Option<usize>,
    /// wan: other POP3 proxies run in popbridge's place for context (client, proxy, relay,
    /// Dovecot's POP3), comma-separated [default: none]. Each must be installed (Debian:
    /// nginx-core libnginx-mod-mail; perdition).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub wan_peers: Vec<Peer>,
    /// polls: users [default: 2000; 20 with --smoke].
    #[arg(long, value_name = "N")]
    pub poll_users: Option<usize>,
    /// polls: sessions started per second in the fixed-rate phase [default: 20].
    #[arg(long, value_name = "N")]
    pub poll_rate: Option<f64>,
    /// polls: clients polling back to back in the saturation phase [default: 32].
    #[arg(long, value_name = "N")]
    pub poll_clients: Option<usize>,
}

impl Opts {
    pub fn delays(&self, smoke: bool) -> Vec<f64> {
        if !self.wan_delay.is_empty() {
            self.wan_delay.clone()
        } else if smoke {
            vec![1.0]
        } else {
            vec![5.0, 12.5, 25.0]
        }
    }
    pub fn workloads(&self) -> Vec<Workload> {
        if self.wan_workload.is_empty() {
            vec![
                Workload::Mixed,
                Workload::Small,
                Workload::Huge,
                Workload::Big,
            ]
        } else {
            self.wan_workload.clone()
        }
    }
    pub fn poll_users(&self, smoke: bool) -> usize {
        self.poll_users.unwrap_or(if smoke { 20 } else { 2000 })
    }
}

/// The users a scenario logs in as (all are created before any login).
pub fn users(scenario: &str, opts: &Opts, smoke: bool) -> Vec<String> {
    match scenario {
        "wan" => ["tput", "wsmall", "whuge", "wbig"]
            .map(String::from)
            .to_vec(),
        "polls" => (0..opts.poll_users(smoke))
            .map(|u| format!("poll{u}"))
            .collect(),
        "previews" => vec!["tput".into()],
        _ => Vec::new(),
    }
}

/// The `p`-th percentile (0-100) by nearest rank; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}
