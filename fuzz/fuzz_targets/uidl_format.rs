//! `UidlFormat::parse` on arbitrary strings (`pop3_uidl_format` comes from the config file).
//!
//! Input layout: bytes 0..12 = three u32 (uid a, uid b, uidvalidity), the rest = the format
//! string (invalid UTF-8 is decoded lossily, so non-ASCII characters are exercised too).
//!
//! Checks: no panic in `parse`, `format` or the error's `Display`; when `parse` is Ok, every
//! UIDL is 1..=70 chars of 0x21..=0x7E (for the input's values and the extremes 0 and
//! u32::MAX), and two different UIDs never give the same UIDL under one UIDVALIDITY.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::uidl::{UidlFormat, MAX_UIDL_LEN};

fn legal(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_UIDL_LEN && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let (a, b, v) = (word(0), word(4), word(8));
    let src = String::from_utf8_lossy(&data[12..]);

    let f = match UidlFormat::parse(&src) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for (uid, uv) in [
        (a, v),
        (b, v),
        (0, 0),
        (u32::MAX, u32::MAX),
        (a, 0),
        (0, u32::MAX),
    ] {
        let s = f.format(uid, uv);
        assert!(legal(&s), "{src:?} ({uid}, {uv}) -> {s:?}");
    }
    for (x, y) in [(a, b), (0, u32::MAX), (a, a.wrapping_add(1))] {
        if x != y {
            assert_ne!(
                f.format(x, v),
                f.format(y, v),
                "{src:?}: UIDs {x} and {y} collide"
            );
        }
    }
    // Deterministic and re-parseable from the same source.
    assert_eq!(UidlFormat::parse(&src).as_ref(), Ok(&f));
});
