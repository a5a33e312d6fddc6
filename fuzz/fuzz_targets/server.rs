//! The server direction: framing (streamed literals, status text), response parsing, dissect's
//! records. The first octet chooses how the rest is fed to the framer; see
//! `imapgate::dissect::self_check`.
#![no_main]

use imapgate::dissect::self_check;
use imapgate::imap::framing::Direction;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = self_check(Direction::Server, data) {
        panic!("{e}");
    }
});
