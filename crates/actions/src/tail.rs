//! A bounded buffer that keeps the last bytes written to it.

use std::collections::VecDeque;

/// Keeps at most `limit` bytes: the most recent ones.
#[derive(Debug)]
pub(crate) struct Tail {
    buf: VecDeque<u8>,
    limit: usize,
}

impl Tail {
    pub(crate) fn new(limit: usize) -> Tail {
        Tail {
            buf: VecDeque::with_capacity(limit.min(64 * 1024)),
            limit,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if data.len() >= self.limit {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.limit..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.limit);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    /// The kept bytes as lossy UTF-8, never longer than the limit: a character cut in two at
    /// the start is dropped, and replacement characters that would overflow are trimmed.
    pub(crate) fn into_string(mut self) -> String {
        let bytes = self.buf.make_contiguous();
        // Skip continuation bytes of a character whose start was dropped (at most 3).
        let skip = bytes
            .iter()
            .take(3)
            .take_while(|&&b| b & 0xC0 == 0x80)
            .count();
        let mut s = String::from_utf8_lossy(&bytes[skip..]).into_owned();
        if s.len() > self.limit {
            let mut cut = s.len() - self.limit;
            while !s.is_char_boundary(cut) {
                cut += 1;
            }
            s.drain(..cut);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.into_string(), "cdefg");

        let mut t = Tail::new(3);
        t.push(b"abcdefgh");
        assert_eq!(t.into_string(), "fgh");

        let mut t = Tail::new(0);
        t.push(b"abc");
        assert_eq!(t.into_string(), "");
    }

    #[test]
    fn never_exceeds_the_limit_in_utf8() {
        // "é" is two bytes; cutting through it must not leave a replacement character.
        let mut t = Tail::new(3);
        t.push("xéab".as_bytes());
        assert_eq!(t.into_string(), "ab");

        // Invalid bytes become U+FFFD (3 bytes each), trimmed to fit.
        let mut t = Tail::new(4);
        t.push(&[0xff, 0xfe, b'o', b'k']);
        let s = t.into_string();
        assert!(s.len() <= 4, "{s:?}");
        assert!(s.ends_with("ok"));
    }
}
