//! The `popbridge` binary's larger subcommands: their arguments, the library calls, and the
//! printing of what the library returns. `main.rs` keeps logging, `serve` and `check-config`.

pub mod migrate;
pub mod oauth;
mod print;
mod progress;
