//! Errors shown whole: [`Chain`] displays an error and every source behind it, so a log line
//! says what failed and why (`upstream unavailable: UID FETCH: upstream did not answer within
//! 60s`), while each error type keeps its causes typed.

use std::error::Error;
use std::fmt;

/// Displays `error: source: source of source ...`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn every_source_is_shown() {
        let e = Outer(Inner(std::io::Error::other("disk on fire")));
        assert_eq!(Chain(&e).to_string(), "outer: inner: disk on fire");
    }
}
