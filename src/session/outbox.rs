//! A queue of bytes waiting to be written to one peer.
//!
//! Frames are queued as the `Bytes` the framer produced, so relaying a message copies nothing;
//! the driver stops reading the other peer while the queue is above its high-water mark, which is
//! what bounds memory when one side is faster than the other.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Above this many queued bytes, the peer that feeds the queue is not read.
pub const HIGH_WATER: usize = 256 * 1024;

#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Outbox {
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        self.queue.push_back(bytes);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= HIGH_WATER
    }

    /// The queued bytes as slices for a vectored write (at most `max` of them).
    pub fn chunks<'a>(&'a self, out: &mut Vec<std::io::IoSlice<'a>>, max: usize) {
        out.clear();
        out.extend(
            self.queue
                .iter()
                .take(max)
                .map(|b| std::io::IoSlice::new(b)),
        );
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Everything queued, concatenated, left queued (for transcripts).
    pub fn peek_vec(&self) -> Vec<u8> {
        self.queue.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// Everything queued, concatenated (for tests and transcripts).
    pub fn drain_to_vec(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for chunk in self.queue.drain(..) {
            out.extend_from_slice(&chunk);
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_across_chunks() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"abc"));
        o.push(Bytes::from_static(b""));
        o.push(Bytes::from_static(b"defg"));
        assert_eq!(o.len(), 7);
        o.consume(4);
        assert_eq!(o.len(), 3);
        assert_eq!(o.drain_to_vec(), b"efg");
        assert!(o.is_empty());
    }
}
