//! A message of 20+ MB streams through in pieces: byte-exact, and popbridge's peak memory
//! grows by far less than the message (read from /proc, no timing involved).

mod support;

use support::*;

/// Peak resident set size (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn twenty_megabyte_message_is_streamed_byte_exact_in_bounded_memory() {
    let dc = Dovecot::start();
    dc.add_user("big", "bigpw");
    let big = big_message();
    assert!(big.len() > 20 * 1024 * 1024);
    dc.seed("big", &[b"Subject: small\r\n\r\nwarm-up\r\n", big]);
    let pb = Popbridge::start(&dc, "");

    // Warm up (login, TLS-free upstream, first allocation of buffers), then measure.
    poplib(
        pb.pop3_port(),
        &["user big", "pass bigpw", "retr 1", "quit"],
    )
    .assert_all_ok();
    let before = peak_rss_kib(pb.pid());

    let mut opts = PopOpts::plain(pb.pop3_port());
    opts.no_lines = true;
    let s = poplib_with(
        &opts,
        &["user big", "pass bigpw", "list 2", "retr 2", "quit"],
    );
    s.assert_all_ok();
    let retr = s.step("retr 2");
    assert_eq!(retr.data(), expected_retr_body(big));
    let size: usize = s
        .step("list 2")
        .resp
        .split(' ')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(size, crlf_size(big));

    let grown_kib = peak_rss_kib(pb.pid()).saturating_sub(before);
    eprintln!(
        "peak RSS before {before} KiB, grew by {grown_kib} KiB over a {} byte RETR",
        big.len()
    );
    assert!(
        grown_kib < 16 * 1024,
        "peak memory grew by {grown_kib} KiB for a {} MB message: not streamed",
        big.len() >> 20
    );
}
