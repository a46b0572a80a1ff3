//! How far the IMAP server is, as the sessions before this one measured it: the shortest
//! time a streamed FETCH took to its first body byte in the latest session that measured
//! one. A session starts from it, so its first read-ahead window is sized for the link (up
//! to 4 MiB at 50 ms) instead of the 1 MiB of an unknown one, and a distant server's FETCH
//! queue runs from the first message on; the session's own measurement replaces it as soon
//! as it has one (a link that got slower or faster is followed by the next session).
//! Memory stays within the bounds stated at `ImapMaildrop::stream_budget`: a stale figure
//! only changes the window's size within them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The latest session's FETCH round trip, in microseconds (0: none measured yet).
#[derive(Debug, Default)]
pub(super) struct ServerDistance(AtomicU64);

impl ServerDistance {
    pub(super) fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub(super) fn record(&self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.store(us, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_measured_then_the_latest_measurement() {
        let d = ServerDistance::default();
        assert_eq!(d.get(), None);
        d.record(Duration::from_millis(50));
        assert_eq!(d.get(), Some(Duration::from_millis(50)));
        // A later session on a nearer link replaces it (not a minimum over all time).
        d.record(Duration::from_millis(12));
        assert_eq!(d.get(), Some(Duration::from_millis(12)));
        // A round trip under a microsecond still counts as measured.
        d.record(Duration::from_nanos(300));
        assert_eq!(d.get(), Some(Duration::from_micros(1)));
    }
}
