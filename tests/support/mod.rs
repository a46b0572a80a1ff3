//! The integration tests' view of the test kit (`testkit/`, crate `popbridge-testkit`, shared
//! with the benchmark): everything it exports, plus `Popbridge::start`, which runs this
//! package's `popbridge`. Use it from a test file with `mod support;` and `use support::*;`.
#![allow(dead_code, unused_imports)]

pub use popbridge_testkit::*;

/// The `popbridge` executable cargo built for these tests.
pub const POPBRIDGE_BIN: &str = env!("CARGO_BIN_EXE_popbridge");

/// `Popbridge::start(&upstream, extra_toml)`: [`Popbridge::start_bin`] with [`POPBRIDGE_BIN`].
pub trait StartPopbridge {
    /// Against any [`MailServer`] (the private Dovecot or Cyrus); see [`Popbridge`] for the
    /// configuration it runs with.
    fn start<S: MailServer + ?Sized>(upstream: &S, extra_toml: &str) -> Self;
}

impl StartPopbridge for Popbridge {
    fn start<S: MailServer + ?Sized>(upstream: &S, extra_toml: &str) -> Popbridge {
        Popbridge::start_bin(POPBRIDGE_BIN, upstream, extra_toml)
    }
}
