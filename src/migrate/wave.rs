//! Running a wave of users: in parallel (tokio tasks, `jobs` at a time), with a bounded number
//! of connections per backend ([`Gates`]), throttling answered by a wave-wide pause with
//! bounded exponential backoff and a retry of the user ([`Pacer`]), a stop signal (stop
//! starting users; then abandon those in flight), and every outcome recorded in the wave's
//! [`Journal`] before it is handed over.
//!
//! Retrying or abandoning a user is safe: a job only writes the map at its end, METADATA as a
//! new generation whose head is written last, the local state in one sled batch; a user
//! abandoned half-way leaves the copies it had.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::journal::{Class, Journal, JournalError};
use super::report::UserOutcome;
use super::MigrateError;

/// How a wave runs.
#[derive(Debug, Clone)]
pub struct WaveSettings {
    /// Users worked on at once.
    pub jobs: usize,
    /// Connections open at once to each backend (legacy, new store).
    pub connections_per_backend: usize,
    /// The first pause after a throttling answer; it doubles with each one in a row.
    pub backoff_first: Duration,
    /// The longest pause.
    pub backoff_max: Duration,
    /// Tries per user when the backends throttle (the last error is reported after them).
    pub attempts: u32,
}

impl Default for WaveSettings {
    fn default() -> WaveSettings {
        WaveSettings {
            jobs: 1,
            connections_per_backend: 1,
            backoff_first: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            attempts: 8,
        }
    }
}

/// The wave-wide pause: each throttling answer doubles it (from `first`, up to `max`) and
/// pushes the time before which no connection is opened; each user done halves it again.
pub struct Pacer {
    first: Duration,
    max: Duration,
    state: Mutex<PacerState>,
}

struct PacerState {
    level: u32,
    until: Instant,
    throttles: u64,
}

impl Pacer {
    pub fn new(first: Duration, max: Duration) -> Pacer {
        Pacer {
            first,
            max,
            state: Mutex::new(PacerState {
                level: 0,
                until: Instant::now(),
                throttles: 0,
            }),
        }
    }

    /// A backend throttled: the pause grows; the pause applied.
    pub fn throttled(&self) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.level = (s.level + 1).min(20);
        s.throttles += 1;
        let pause = pause(self.first, self.max, s.level, s.throttles);
        let until = Instant::now() + pause;
        if until > s.until {
            s.until = until;
        }
        pause
    }

    /// A user got through: the next pause is shorter.
    pub fn ok(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.level = s.level.saturating_sub(1);
    }

    /// Throttling answers so far.
    pub fn throttles(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .throttles
    }

    /// Waits out the current pause (which may grow meanwhile).
    pub async fn wait(&self) {
        loop {
            let until = self.state.lock().unwrap_or_else(|p| p.into_inner()).until;
            if until <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// `first` doubled `level - 1` times, at most `max`, less up to a quarter (spread by `salt`)
/// so that the users paused together do not come back together.
fn pause(first: Duration, max: Duration, level: u32, salt: u64) -> Duration {
    let full = first
        .saturating_mul(1u32 << (level.saturating_sub(1)).min(20))
        .min(max);
    let spread = (salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u32; // 0..=255
    full - full / 4 * spread / 255
}

/// What one user's work passes before each connection it opens: the wave's pause, then a
/// permit for that backend (dropped when the connection is closed).
#[derive(Clone)]
pub struct Gates {
    legacy: Arc<Semaphore>,
    new: Arc<Semaphore>,
    pacer: Arc<Pacer>,
}

impl Gates {
    pub fn new(settings: &WaveSettings) -> Gates {
        let n = settings.connections_per_backend.max(1);
        Gates {
            legacy: Arc::new(Semaphore::new(n)),
            new: Arc::new(Semaphore::new(n)),
            pacer: Arc::new(Pacer::new(settings.backoff_first, settings.backoff_max)),
        }
    }

    async fn pass(&self, sem: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        self.pacer.wait().await;
        // The semaphores are never closed.
        sem.clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("wave semaphores are never closed"))
    }

    /// Before a connection to the legacy backend.
    pub async fn legacy(&self) -> OwnedSemaphorePermit {
        self.pass(&self.legacy).await
    }

    /// Before a connection to the new store.
    pub async fn new_store(&self) -> OwnedSemaphorePermit {
        self.pass(&self.new).await
    }

    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }
}

/// One kind of work done per user of a wave (`uidls`, `verify`, `import`).
pub trait WaveJob: Send + Sync + 'static {
    /// What the job needs for one user.
    type Item: Send + Sync + 'static;
    type Report: Send + 'static;
    /// The client login of `item` (what the journal and the reports name).
    fn login(item: &Self::Item) -> &str;
    /// How a report counts (clean, needs attention).
    fn class(report: &Self::Report) -> Class;
    /// Works on one user, passing `gates` before each connection.
    fn run(
        self: Arc<Self>,
        item: &Self::Item,
        gates: &Gates,
    ) -> impl Future<Output = UserOutcome<Self::Report>> + Send;
}

/// How far a stop request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    Run,
    /// Start no new user; finish those in flight.
    NoNewUsers,
    /// Abandon the users in flight too (their outcomes are not recorded: a re-run redoes them).
    Abandon,
}

/// What a running wave hands over, in the order things happen.
#[derive(Debug)]
pub enum WaveEvent<R> {
    /// A user's outcome, already recorded in the journal. `attempts` counts the tries (more
    /// than one when a backend throttled).
    User {
        outcome: UserOutcome<R>,
        class: Class,
        attempts: u32,
    },
    /// A user in flight was abandoned (a second stop request, or throttled after the first).
    Abandoned { user: String },
    /// The journal could not record an outcome: the wave stops starting users.
    Journal(JournalError),
    /// The wave is over; `not_started` users were left (stopped), `throttles` counts the
    /// throttling answers met.
    End { not_started: usize, throttles: u64 },
}

/// A wave under way: its events, and its stop signal.
pub struct WaveRun<R> {
    rx: mpsc::UnboundedReceiver<WaveEvent<R>>,
    stop: watch::Sender<Stop>,
    journal: Option<Journal>,
}

impl<R: Send + 'static> WaveRun<R> {
    /// Starts `items` (with the users already done taken out by the caller, see
    /// [`Journal::done`]); must be called inside a tokio runtime.
    pub fn start<J: WaveJob<Report = R>>(
        job: Arc<J>,
        items: Vec<J::Item>,
        settings: &WaveSettings,
        journal: Option<Journal>,
    ) -> WaveRun<R> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(Stop::Run);
        let gates = Gates::new(settings);
        tokio::spawn(dispatch(job, items, settings.clone(), gates, tx, stop_rx));
        WaveRun { rx, stop, journal }
    }

    /// Asks the wave to stop as far as `how` says (never back).
    pub fn stop(&self, how: Stop) {
        self.stop.send_if_modified(|s| {
            let more = how > *s;
            if more {
                *s = how;
            }
            more
        });
    }

    /// How far the wave was asked to stop.
    pub fn stopping(&self) -> Stop {
        *self.stop.borrow()
    }

    /// The next event; `None` after [`WaveEvent::End`]. A user's outcome is recorded (and
    /// synced) in the journal before it is returned.
    pub async fn next(&mut self) -> Option<WaveEvent<R>> {
        let event = self.rx.recv().await?;
        if let WaveEvent::User { outcome, class, .. } = &event {
            if let Some(j) = &mut self.journal {
                if let Err(e) = j.record(&outcome.user, *class) {
                    self.stop(Stop::NoNewUsers);
                    self.journal = None;
                    return Some(WaveEvent::Journal(e));
                }
            }
        }
        Some(event)
    }
}

async fn dispatch<J: WaveJob>(
    job: Arc<J>,
    items: Vec<J::Item>,
    settings: WaveSettings,
    gates: Gates,
    tx: mpsc::UnboundedSender<WaveEvent<J::Report>>,
    mut stop: watch::Receiver<Stop>,
) {
    let jobs = Arc::new(Semaphore::new(settings.jobs.max(1)));
    let mut set = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut items = items.into_iter();
    let mut not_started = 0;
    let finished = |r: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
                    in_flight: &mut HashMap<tokio::task::Id, String>| {
        match r {
            Ok((id, ())) => {
                in_flight.remove(&id);
            }
            Err(e) => {
                if let Some(user) = in_flight.remove(&e.id()) {
                    let _ = tx.send(WaveEvent::Abandoned { user });
                }
            }
        }
    };
    for item in items.by_ref() {
        let permit = tokio::select! {
            p = jobs.clone().acquire_owned() => p.unwrap_or_else(|_| unreachable!("never closed")),
            _ = stopping(&mut stop, Stop::NoNewUsers) => {
                not_started = 1;
                break;
            }
        };
        while let Some(r) = set.try_join_next_with_id() {
            finished(r, &mut in_flight);
        }
        if *stop.borrow() >= Stop::NoNewUsers {
            not_started = 1;
            break;
        }
        let user = J::login(&item).to_owned();
        let handle = set.spawn(one_user(
            job.clone(),
            item,
            gates.clone(),
            settings.attempts,
            stop.clone(),
            tx.clone(),
            permit,
        ));
        in_flight.insert(handle.id(), user);
    }
    not_started += items.len();
    loop {
        tokio::select! {
            r = set.join_next_with_id() => match r {
                Some(r) => finished(r, &mut in_flight),
                None => break,
            },
            _ = stopping(&mut stop, Stop::Abandon) => {
                set.abort_all();
                while let Some(r) = set.join_next_with_id().await {
                    finished(r, &mut in_flight);
                }
                break;
            }
        }
    }
    let _ = tx.send(WaveEvent::End {
        not_started,
        throttles: gates.pacer().throttles(),
    });
}

/// Resolves once a stop as far as `how` was asked for.
async fn stopping(stop: &mut watch::Receiver<Stop>, how: Stop) {
    if stop.wait_for(|s| *s >= how).await.is_err() {
        // The wave's handle is gone: nobody can ask any more.
        std::future::pending::<()>().await;
    }
}

async fn one_user<J: WaveJob>(
    job: Arc<J>,
    item: J::Item,
    gates: Gates,
    attempts: u32,
    stop: watch::Receiver<Stop>,
    tx: mpsc::UnboundedSender<WaveEvent<J::Report>>,
    _permit: OwnedSemaphorePermit,
) {
    let mut attempt = 1;
    loop {
        let outcome = job.clone().run(&item, &gates).await;
        let throttled = outcome
            .result
            .as_ref()
            .err()
            .is_some_and(MigrateError::throttled);
        if !throttled {
            gates.pacer().ok();
        } else {
            gates.pacer().throttled();
            if *stop.borrow() >= Stop::NoNewUsers {
                let _ = tx.send(WaveEvent::Abandoned {
                    user: outcome.user.clone(),
                });
                return;
            }
            if attempt < attempts {
                attempt += 1;
                continue;
            }
        }
        let class = match &outcome.result {
            Ok(r) => J::class(r),
            Err(_) => Class::Failed,
        };
        let _ = tx.send(WaveEvent::User {
            outcome,
            class,
            attempts: attempt,
        });
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_bound_with_some_spread() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for salt in 0..50 {
            let p1 = pause(first, max, 1, salt);
            assert!(p1 <= first && p1 >= first * 3 / 4, "{p1:?}");
            let p3 = pause(first, max, 3, salt);
            assert!(p3 <= first * 4 && p3 >= first * 3, "{p3:?}");
            let p20 = pause(first, max, 20, salt);
            assert!(p20 <= max && p20 >= max * 3 / 4, "{p20:?}");
        }
        let spread: std::collections::HashSet<Duration> =
            (0..50).map(|s| pause(first, max, 2, s)).collect();
        assert!(spread.len() > 10, "paused users come back spread out");
    }

    #[tokio::test]
    async fn the_pacer_holds_connections_back_and_lets_go() {
        let p = Pacer::new(Duration::from_millis(40), Duration::from_millis(200));
        let t = Instant::now();
        p.wait().await;
        assert!(t.elapsed() < Duration::from_millis(30));
        p.throttled();
        p.throttled();
        let t = Instant::now();
        p.wait().await;
        assert!(
            t.elapsed() >= Duration::from_millis(55),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(p.throttles(), 2);
        p.ok();
        p.ok();
        p.ok();
        assert_eq!(p.state.lock().unwrap().level, 0);
    }
}
