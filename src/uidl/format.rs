//! UIDL strings in Dovecot's `pop3_uidl_format` syntax, so that clients migrating from a Dovecot
//! POP3 server see the same UIDLs and do not download every message again.
//!
//! Only the variables an IMAP client can know are supported: `%u` / `%{uid}` and `%v` /
//! `%{uidvalidity}`. A width with a leading `0` zero-pads (`%08u`); `X` (or `x`) before the
//! variable prints it in hexadecimal. Dovecot prints that hex in lower case even for `X`
//! (`%08Xu%08Xv` gives `000000016b080e83` for UID 1, UIDVALIDITY 0x6b080e83), and so do we.

use std::fmt::Write as _;

/// Longest UIDL RFC 1939 allows.
pub const MAX_UIDL_LEN: usize = 70;

/// Dovecot's default `pop3_uidl_format`.
pub const DEFAULT_UIDL_FORMAT: &str = "%08Xu%08Xv";

/// Named formats of common POP3 servers, accepted wherever a format string is. The same four
/// Cyrus IMAP offers as its own `uidl_format` option (lib/imapoptions, Cyrus 3.x: "uidonly" is
/// the UID, "cyrus" UIDVALIDITY.UID, "dovecot" 8 lower-case hex digits each of UID and
/// UIDVALIDITY, "courier" UIDVALIDITY-UID); Dovecot's `pop3_uidl_format` documentation lists
/// the same equivalents for Cyrus and Courier.
pub const PRESETS: &[(&str, &str)] = &[
    // Dovecot's default: UID then UIDVALIDITY, 8 lower-case hex digits each.
    ("dovecot", DEFAULT_UIDL_FORMAT),
    // Cyrus IMAP 2.1.4 and later: `UIDVALIDITY.UID`, decimal.
    ("cyrus", "%v.%u"),
    // Courier IMAP's POP3 (maildirs it assigned IMAP UIDs to): `UIDVALIDITY-UID`, decimal.
    ("courier", "%v-%u"),
    // The bare IMAP UID (Cyrus before 2.1.4, and many small servers).
    ("uid", "%u"),
];

/// The format string a preset name stands for, or `s` itself when it names none.
pub fn expand_preset(s: &str) -> &str {
    PRESETS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s.trim()))
        .map(|(_, f)| *f)
        .unwrap_or(s)
}

/// Why a `pop3_uidl_format` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidlFormatError {
    #[error("pop3_uidl_format is empty")]
    Empty,
    #[error(
        "pop3_uidl_format: variable {0} is not available through IMAP \
         (only %u/%{{uid}} and %v/%{{uidvalidity}} are)"
    )]
    UnsupportedVariable(String),
    #[error("pop3_uidl_format: modifier '{0}' is not supported (only X/x for hex)")]
    UnsupportedModifier(char),
    #[error(
        "pop3_uidl_format: width {0} without a leading 0 truncates in Dovecot and would make \
         UIDLs collide; use %0{0}... to pad"
    )]
    TruncatingWidth(usize),
    #[error("pop3_uidl_format: offsets (%N.M) are not supported")]
    Offset,
    #[error("pop3_uidl_format: '%' at the end of the format")]
    Dangling,
    #[error("pop3_uidl_format: unterminated %{{...}}")]
    Unterminated,
    #[error("pop3_uidl_format: character {0:?} is not allowed in a UIDL (RFC 1939: 0x21..0x7E)")]
    IllegalChar(char),
    #[error("pop3_uidl_format: results can be {0} characters long, a UIDL has at most 70")]
    TooLong(usize),
    #[error("pop3_uidl_format: no %u/%{{uid}}, so all messages would share one UIDL")]
    NoUid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Uid,
    UidValidity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Var { var: Var, width: usize, hex: bool },
}

/// A parsed, validated `pop3_uidl_format`: every UIDL it produces is 1..=70 characters of
/// 0x21..0x7E.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlFormat {
    pieces: Vec<Piece>,
}

impl Default for UidlFormat {
    fn default() -> Self {
        Self {
            pieces: vec![
                Piece::Var {
                    var: Var::Uid,
                    width: 8,
                    hex: true,
                },
                Piece::Var {
                    var: Var::UidValidity,
                    width: 8,
                    hex: true,
                },
            ],
        }
    }
}

impl UidlFormat {
    /// Parses and validates a format string or a preset name (see [`PRESETS`]).
    pub fn parse(s: &str) -> Result<UidlFormat, UidlFormatError> {
        let s = expand_preset(s);
        if s.is_empty() {
            return Err(UidlFormatError::Empty);
        }
        let chars: Vec<char> = s.chars().collect();
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            if c != '%' {
                if !('\x21'..='\x7e').contains(&c) {
                    return Err(UidlFormatError::IllegalChar(c));
                }
                literal.push(c);
                continue;
            }
            let Some(&next) = chars.get(i) else {
                return Err(UidlFormatError::Dangling);
            };
            if next == '%' {
                literal.push('%');
                i += 1;
                continue;
            }
            // Width: a leading 0 pads; digits without it would truncate in Dovecot.
            let zero_pad = next == '0';
            let mut width = 0usize;
            let mut has_width = false;
            while let Some(d) = chars.get(i).and_then(|c| c.to_digit(10)) {
                has_width = true;
                width = width.saturating_mul(10).saturating_add(d as usize);
                i += 1;
            }
            if chars.get(i) == Some(&'.') {
                return Err(UidlFormatError::Offset);
            }
            if has_width && !zero_pad && width > 0 {
                return Err(UidlFormatError::TruncatingWidth(width));
            }
            let mut hex = false;
            // Modifiers are upper-case letters (and our `x`) before the variable.
            while let Some(&m) = chars.get(i) {
                let followed = chars.get(i + 1).is_some();
                if (m == 'X' || m == 'x') && followed {
                    hex = true;
                    i += 1;
                } else if m.is_ascii_uppercase() && followed {
                    return Err(UidlFormatError::UnsupportedModifier(m));
                } else {
                    break;
                }
            }
            let var = match chars.get(i) {
                None => return Err(UidlFormatError::Dangling),
                Some('{') => {
                    let start = i + 1;
                    let Some(len) = chars[start..].iter().position(|&c| c == '}') else {
                        return Err(UidlFormatError::Unterminated);
                    };
                    let name: String = chars[start..start + len].iter().collect();
                    i = start + len + 1;
                    match name.as_str() {
                        "uid" => Var::Uid,
                        "uidvalidity" => Var::UidValidity,
                        _ => {
                            return Err(UidlFormatError::UnsupportedVariable(format!(
                                "%{{{name}}}"
                            )))
                        }
                    }
                }
                Some(&v) => {
                    i += 1;
                    match v {
                        'u' => Var::Uid,
                        'v' => Var::UidValidity,
                        other => {
                            return Err(UidlFormatError::UnsupportedVariable(format!("%{other}")))
                        }
                    }
                }
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Var { var, width, hex });
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !pieces
            .iter()
            .any(|p| matches!(p, Piece::Var { var: Var::Uid, .. }))
        {
            return Err(UidlFormatError::NoUid);
        }
        let max_len: usize = pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(l) => l.len(),
                // u32::MAX: 10 decimal digits, 8 hex digits.
                Piece::Var { width, hex, .. } => (*width).max(if *hex { 8 } else { 10 }),
            })
            // Saturating: absurd widths must be refused, not wrapped into a small total.
            .fold(0usize, usize::saturating_add);
        if max_len > MAX_UIDL_LEN {
            return Err(UidlFormatError::TooLong(max_len));
        }
        Ok(UidlFormat { pieces })
    }

    /// The UIDL of message `uid` in a mailbox with this UIDVALIDITY.
    pub fn format(&self, uid: u32, uid_validity: u32) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(l) => out.push_str(l),
                Piece::Var { var, width, hex } => {
                    let v = match var {
                        Var::Uid => uid,
                        Var::UidValidity => uid_validity,
                    };
                    // Writing to a String cannot fail.
                    let _ = if *hex {
                        write!(out, "{v:0width$x}", width = *width)
                    } else {
                        write!(out, "{v:0width$}", width = *width)
                    };
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legal(s: &str) -> bool {
        !s.is_empty() && s.len() <= MAX_UIDL_LEN && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
    }

    #[test]
    fn default_matches_dovecot_lower_case_hex() {
        let f = UidlFormat::parse(DEFAULT_UIDL_FORMAT).unwrap();
        assert_eq!(f.format(1, 0x6b08_0e83), "000000016b080e83");
        assert_eq!(f, UidlFormat::default());
        assert_eq!(f.format(u32::MAX, u32::MAX), "ffffffffffffffff");
    }

    #[test]
    fn braces_decimal_literals_and_percent() {
        let f = UidlFormat::parse("%{uidvalidity}-%{uid}%%").unwrap();
        assert_eq!(f.format(42, 7), "7-42%");
        let f = UidlFormat::parse("u%05u.v%x{uidvalidity}").unwrap();
        assert_eq!(f.format(42, 255), "u00042.vff");
        let f = UidlFormat::parse("%u").unwrap();
        assert_eq!(f.format(4_294_967_295, 0), "4294967295");
    }

    #[test]
    fn presets_expand_to_the_servers_formats() {
        let v = 0x6b08_0e83;
        let f = |p: &str| UidlFormat::parse(p).unwrap().format(7, v);
        assert_eq!(f("dovecot"), "000000076b080e83");
        assert_eq!(f("Dovecot"), f(DEFAULT_UIDL_FORMAT));
        assert_eq!(f("cyrus"), "1795690115.7");
        assert_eq!(f("courier"), "1795690115-7");
        assert_eq!(f("uid"), "7");
        assert_eq!(expand_preset("%u-x"), "%u-x");
        // Not a preset and not a valid format: the error names the variable.
        assert!(UidlFormat::parse("cyrux").is_err());
    }

    #[test]
    fn unsupported_variables_are_named() {
        for (fmt, var) in [
            ("%m", "%m"),
            ("%f", "%f"),
            ("%g%u", "%g"),
            ("%{md5}", "%{md5}"),
            ("%08Xq", "%q"),
        ] {
            let e = UidlFormat::parse(fmt).unwrap_err();
            assert_eq!(e, UidlFormatError::UnsupportedVariable(var.into()), "{fmt}");
            assert!(e.to_string().contains(var));
        }
    }

    #[test]
    fn malformed_formats_rejected() {
        assert_eq!(UidlFormat::parse(""), Err(UidlFormatError::Empty));
        assert_eq!(UidlFormat::parse("%u%"), Err(UidlFormatError::Dangling));
        assert_eq!(
            UidlFormat::parse("%08X"),
            Err(UidlFormatError::UnsupportedVariable("%X".into()))
        );
        assert_eq!(
            UidlFormat::parse("%{uid"),
            Err(UidlFormatError::Unterminated)
        );
        assert_eq!(
            UidlFormat::parse("%u %v"),
            Err(UidlFormatError::IllegalChar(' '))
        );
        assert_eq!(
            UidlFormat::parse("%uä"),
            Err(UidlFormatError::IllegalChar('ä'))
        );
        assert_eq!(
            UidlFormat::parse("%8u"),
            Err(UidlFormatError::TruncatingWidth(8))
        );
        assert_eq!(UidlFormat::parse("%1.2u"), Err(UidlFormatError::Offset));
        assert_eq!(
            UidlFormat::parse("%Lu"),
            Err(UidlFormatError::UnsupportedModifier('L'))
        );
        assert_eq!(UidlFormat::parse("%v"), Err(UidlFormatError::NoUid));
        assert_eq!(UidlFormat::parse("abc"), Err(UidlFormatError::NoUid));
        assert!(matches!(
            UidlFormat::parse("%080u"),
            Err(UidlFormatError::TooLong(80))
        ));
        let long = format!("{}%u", "a".repeat(61));
        assert_eq!(UidlFormat::parse(&long), Err(UidlFormatError::TooLong(71)));
        // Absurd widths must not overflow.
        assert!(matches!(
            UidlFormat::parse("%099999999999999999999999u"),
            Err(UidlFormatError::TooLong(_))
        ));
    }

    #[test]
    fn every_accepted_format_yields_legal_uidls() {
        for fmt in [
            "%08Xu%08Xv",
            "%u",
            "%v.%u",
            "%{uid}",
            "%%%u%%",
            "%070u",
            "%010u%010v",
        ] {
            let f = UidlFormat::parse(fmt).unwrap();
            for (u, v) in [(0, 0), (1, 1), (u32::MAX, u32::MAX), (123, 0x6b08_0e83)] {
                let s = f.format(u, v);
                assert!(legal(&s), "{fmt} -> {s:?}");
            }
        }
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// fuzz/artifacts/uidl_format/crash-1bf83f1e…: a width so large it wraps when summed.
    #[test]
    fn huge_width_is_rejected_not_wrapped() {
        for src in [
            "1v.%%v.%003355443400000000000000017956901115u%u.%u",
            // fuzz/regressions/uidl_format/width-sum-overflow-min
            "a%099999999999999999999u",
        ] {
            assert!(
                matches!(UidlFormat::parse(src), Err(UidlFormatError::TooLong(_))),
                "{src}"
            );
        }
    }
}
