//! The POP3 client side: [`client`] (connect, log in, UIDL/LIST/TOP/RETR, hand the connection
//! over) and [`response`] (status lines, response codes, multi-line data, listings).

pub mod client;
pub mod response;

pub use client::Pop3Client;
pub use response::{ListedMessage, LoginRefusal, Pop3Error};
