//! POP3 on the wire: CRLF line ends, RFC 1939 dot-stuffing, what RETR and TOP should carry.

/// Size of `msg` with every bare LF counted as CRLF: what POP3 LIST and IMAP RFC822.SIZE say.
pub fn crlf_size(msg: &[u8]) -> usize {
    msg.len() + bare_lfs(msg)
}

fn bare_lfs(msg: &[u8]) -> usize {
    msg.iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || msg[i - 1] != b'\r'))
        .count()
}

/// `msg` with every bare LF turned into CRLF.
pub fn to_crlf(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + bare_lfs(msg));
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// What a POP3 server's RETR should carry for `msg` before dot-stuffing: CRLF line ends, and a
/// final CRLF added when the message lacks one (Dovecot does this).
pub fn expected_retr_body(msg: &[u8]) -> Vec<u8> {
    let mut body = to_crlf(msg);
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// RFC 1939 byte-stuffing plus the terminating `.CRLF`, for a body whose lines end in CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 3);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Undoes [`dot_stuff`]: the data part of a multi-line response (status line already removed),
/// up to the `.CRLF` terminator. Panics if there is no terminator.
pub fn dot_unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| panic!("multi-line response without .CRLF terminator"));
        let line = &rest[..end];
        if line == b"." {
            assert_eq!(
                end + 2,
                rest.len(),
                "bytes after the .CRLF terminator of a multi-line response"
            );
            return out;
        }
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
        rest = &rest[end + 2..];
    }
}

/// Splits a raw POP3 response into its status line (without CRLF) and the rest.
pub fn split_status(raw: &[u8]) -> (&[u8], &[u8]) {
    let end = raw
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("response without CRLF");
    (&raw[..end], &raw[end + 2..])
}

/// RFC 1939 TOP n: all header lines, the blank line, then the first `n` body lines (CRLF form).
pub fn expected_top(msg: &[u8], n: usize) -> Vec<u8> {
    let body = expected_retr_body(msg);
    let sep = body.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(sep) = sep else { return body };
    let mut out = body[..sep + 4].to_vec();
    let mut lines = 0;
    let mut rest = &body[sep + 4..];
    while lines < n && !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        out.extend_from_slice(&rest[..end]);
        rest = &rest[end..];
        lines += 1;
    }
    out
}
