//! Modified UTF-7 for IMAP mailbox names (RFC 3501 section 5.1.3), strict both ways.
//!
//! Printable US-ASCII (0x20..=0x7e) except `&` stands for itself, `&` is written `&-`, and every
//! other run of characters is one shifted run `&...-` holding the UTF-16BE code units in base64
//! (RFC 2152) with `,` instead of `/`, without `=` padding and with the padding bits zero.
//!
//! # Why strict
//!
//! The proxy makes policy decisions on mailbox names, and the server then acts on the bytes the
//! proxy forwards. If the decoder accepted two spellings of one name (`&AGE-` for `a`, a split
//! shift `&AOQ-&AOQ-` for `&AOQA5A-`, stray padding bits, ...) a policy could be made to check
//! one spelling while a lenient server treats another as the same mailbox, or a strict server as
//! a different one. So [`decode`] accepts exactly the strings [`encode`] produces: every name
//! has one spelling, and `encode(decode(b)?) == b` for every accepted `b`.
//!
//! The modified base64 is hand-written here (a 64-entry alphabet and a 256-entry reverse table)
//! rather than taken from the `base64` crate: the alphabet differs, padding is absent and the
//! strictness checks have to look at every 16-bit unit as it is completed anyway.

use std::borrow::Cow;

/// Why a byte string is not canonical modified UTF-7.
///
/// Every variant carries `offset`, a byte offset into the input given to [`decode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mutf7Error {
    /// A byte outside a shift that is not printable US-ASCII (below 0x20, 0x7f, or 0x80 and up).
    #[error("byte 0x{byte:02x} at offset {offset} is not printable US-ASCII")]
    NonPrintable { offset: usize, byte: u8 },
    /// A shift that the input ends inside of; `offset` is its `&`.
    #[error("shift starting at offset {offset} is not terminated by '-'")]
    UnterminatedShift { offset: usize },
    /// A byte inside a shift that is neither in the modified base64 alphabet nor `-`.
    #[error("byte 0x{byte:02x} at offset {offset} is not modified base64")]
    InvalidBase64 { offset: usize, byte: u8 },
    /// The bits left over after the last complete 16-bit unit are not all zero; `offset` is the
    /// closing `-`.
    #[error("non-zero padding bits in the shift closed at offset {offset}")]
    NonZeroPadding { offset: usize },
    /// Six or more bits are left over after the last complete 16-bit unit, i.e. a superfluous
    /// base64 character or a truncated unit; `offset` is the closing `-`.
    #[error("partial 16-bit unit at the end of the shift closed at offset {offset}")]
    PartialUnit { offset: usize },
    /// A shift that encodes a printable US-ASCII character, which must be written literally
    /// (`&` included: it is written `&-`). `offset` is the base64 character completing the unit.
    #[error("shift encodes printable US-ASCII U+{unit:04X} at offset {offset}; it must be literal")]
    EncodedPrintable { offset: usize, unit: u16 },
    /// A shift with base64 characters that complete no 16-bit unit (like `&A-`); the only empty
    /// shift allowed is `&-`, which means `&`. `offset` is the `&`.
    #[error("empty shift at offset {offset}")]
    EmptyShift { offset: usize },
    /// A shift that starts right where the previous one ended (`&AOQ-&AOQ-`); the two must be one
    /// shift (`&AOQA5A-`). `offset` is the second `&`.
    #[error("shift at offset {offset} directly follows another shift; they must be merged")]
    AdjacentShifts { offset: usize },
    /// A high surrogate not followed, in the same shift, by a low surrogate. `offset` is the
    /// base64 character completing the high surrogate.
    #[error("unpaired high surrogate U+{unit:04X} at offset {offset}")]
    UnpairedHighSurrogate { offset: usize, unit: u16 },
    /// A low surrogate not preceded by a high surrogate (unpaired, or a pair in reverse order).
    /// `offset` is the base64 character completing it.
    #[error("low surrogate U+{unit:04X} without a preceding high surrogate at offset {offset}")]
    UnpairedLowSurrogate { offset: usize, unit: u16 },
}

impl Mutf7Error {
    /// The byte offset into the input at which the problem was found.
    pub fn offset(&self) -> usize {
        match *self {
            Self::NonPrintable { offset, .. }
            | Self::UnterminatedShift { offset }
            | Self::InvalidBase64 { offset, .. }
            | Self::NonZeroPadding { offset }
            | Self::PartialUnit { offset }
            | Self::EncodedPrintable { offset, .. }
            | Self::EmptyShift { offset }
            | Self::AdjacentShifts { offset }
            | Self::UnpairedHighSurrogate { offset, .. }
            | Self::UnpairedLowSurrogate { offset, .. } => offset,
        }
    }
}

/// The modified base64 alphabet: RFC 2045 base64 with `,` in place of `/`.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

/// Marks bytes that are not in [`ALPHABET`] in [`REVERSE`].
const INVALID: u8 = 0xff;

/// Byte to 6-bit value, [`INVALID`] for bytes outside the alphabet.
const REVERSE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Whether `b` stands for itself outside a shift (printable US-ASCII other than `&`).
#[inline]
fn is_direct(b: u8) -> bool {
    matches!(b, 0x20..=0x7e) && b != b'&'
}

/// Whether a character is written literally (possibly as `&-`) rather than inside a shift.
#[inline]
fn is_printable_ascii(c: char) -> bool {
    matches!(c, ' '..='~')
}

/// Encodes a mailbox name, borrowing it when it is already its own encoding (printable
/// US-ASCII without `&`), which is the common case and allocates nothing.
pub fn encode_cow(name: &str) -> Cow<'_, str> {
    if name.bytes().all(is_direct) {
        Cow::Borrowed(name)
    } else {
        let mut out = String::with_capacity(name.len() + name.len() / 2 + 2);
        encode_into(name, &mut out);
        Cow::Owned(out)
    }
}

/// Encodes a mailbox name into canonical modified UTF-7.
pub fn encode(name: &str) -> String {
    encode_cow(name).into_owned()
}

/// Appends the canonical modified UTF-7 encoding of `name` to `out`.
pub fn encode_into(name: &str, out: &mut String) {
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '&' {
            out.push_str("&-");
        } else if is_printable_ascii(c) {
            out.push(c);
        } else {
            // One shift for the whole run of characters that cannot be literal.
            out.push('&');
            let mut buf: u32 = 0;
            let mut bits: u32 = 0;
            let mut units = [0u16; 2];
            let mut next = Some(c);
            while let Some(c) = next {
                for &unit in c.encode_utf16(&mut units).iter() {
                    buf = (buf << 16) | u32::from(unit);
                    bits += 16;
                    while bits >= 6 {
                        bits -= 6;
                        out.push(char::from(ALPHABET[((buf >> bits) & 0x3f) as usize]));
                    }
                    // At most 4 bits remain; keep only those so `buf` cannot overflow.
                    buf &= (1 << bits) - 1;
                }
                next = chars.next_if(|&c| !is_printable_ascii(c));
            }
            if bits > 0 {
                out.push(char::from(ALPHABET[((buf << (6 - bits)) & 0x3f) as usize]));
            }
            out.push('-');
        }
    }
}

/// Decodes canonical modified UTF-7, borrowing the input when it is printable US-ASCII without
/// `&` (its own decoding). Rejects everything that [`encode`] would not have produced.
pub fn decode_cow(bytes: &[u8]) -> Result<Cow<'_, str>, Mutf7Error> {
    if bytes.iter().copied().all(is_direct)
        && let Ok(s) = std::str::from_utf8(bytes)
    {
        return Ok(Cow::Borrowed(s));
    }
    decode_slow(bytes).map(Cow::Owned)
}

/// Decodes canonical modified UTF-7 into an owned string. See [`decode_cow`].
pub fn decode(bytes: &[u8]) -> Result<String, Mutf7Error> {
    decode_cow(bytes).map(Cow::into_owned)
}

/// Whether `bytes` is canonical modified UTF-7, i.e. [`decode`] accepts it.
pub fn is_canonical(bytes: &[u8]) -> bool {
    decode_cow(bytes).is_ok()
}

fn decode_slow(bytes: &[u8]) -> Result<String, Mutf7Error> {
    let mut out = String::with_capacity(bytes.len());
    // The offset just past the `-` closing the last non-empty shift, to refuse adjacent shifts.
    let mut shift_end: Option<usize> = None;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if is_direct(b) {
            out.push(char::from(b));
            i += 1;
        } else if b == b'&' {
            if bytes.get(i + 1) == Some(&b'-') {
                out.push('&');
                i += 2;
            } else {
                if shift_end == Some(i) {
                    return Err(Mutf7Error::AdjacentShifts { offset: i });
                }
                i = decode_shift(bytes, i, &mut out)?;
                shift_end = Some(i);
            }
        } else {
            return Err(Mutf7Error::NonPrintable { offset: i, byte: b });
        }
    }
    Ok(out)
}

/// Decodes the non-empty shift whose `&` is at `start`, appending to `out`. Returns the offset
/// just past its closing `-`.
fn decode_shift(bytes: &[u8], start: usize, out: &mut String) -> Result<usize, Mutf7Error> {
    let mut buf: u32 = 0;
    let mut bits: u32 = 0;
    let mut units = 0usize;
    // A high surrogate waiting for its low half, with the offset that completed it.
    let mut high: Option<(u16, usize)> = None;
    let mut i = start + 1;
    loop {
        let Some(&b) = bytes.get(i) else {
            return Err(Mutf7Error::UnterminatedShift { offset: start });
        };
        if b == b'-' {
            break;
        }
        let value = REVERSE[usize::from(b)];
        if value == INVALID {
            return Err(Mutf7Error::InvalidBase64 { offset: i, byte: b });
        }
        buf = (buf << 6) | u32::from(value);
        bits += 6;
        if bits >= 16 {
            bits -= 16;
            // Truncation is intended: the 16 bits above the `bits` leftover ones.
            let unit = (buf >> bits) as u16;
            buf &= (1 << bits) - 1;
            units += 1;
            match (high.take(), unit) {
                (Some((hi, _)), 0xdc00..=0xdfff) => {
                    let scalar =
                        0x10000 + ((u32::from(hi) - 0xd800) << 10) + (u32::from(unit) - 0xdc00);
                    let c = char::from_u32(scalar)
                        .ok_or(Mutf7Error::UnpairedLowSurrogate { offset: i, unit })?;
                    out.push(c);
                }
                (Some((hi, at)), _) => {
                    return Err(Mutf7Error::UnpairedHighSurrogate {
                        offset: at,
                        unit: hi,
                    });
                }
                (None, 0xd800..=0xdbff) => high = Some((unit, i)),
                (None, 0xdc00..=0xdfff) => {
                    return Err(Mutf7Error::UnpairedLowSurrogate { offset: i, unit });
                }
                (None, 0x20..=0x7e) => {
                    return Err(Mutf7Error::EncodedPrintable { offset: i, unit });
                }
                (None, _) => {
                    let c = char::from_u32(u32::from(unit))
                        .ok_or(Mutf7Error::UnpairedLowSurrogate { offset: i, unit })?;
                    out.push(c);
                }
            }
        }
        i += 1;
    }
    if let Some((unit, offset)) = high {
        return Err(Mutf7Error::UnpairedHighSurrogate { offset, unit });
    }
    if units == 0 {
        return Err(Mutf7Error::EmptyShift { offset: start });
    }
    if bits >= 6 {
        return Err(Mutf7Error::PartialUnit { offset: i });
    }
    if buf != 0 {
        return Err(Mutf7Error::NonZeroPadding { offset: i });
    }
    Ok(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(decoded: &str, encoded: &str) {
        assert_eq!(encode(decoded), encoded, "encode({decoded:?})");
        assert_eq!(
            decode(encoded.as_bytes()).as_deref(),
            Ok(decoded),
            "decode({encoded:?})"
        );
    }

    #[test]
    fn rfc_example() {
        roundtrip("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
    }

    #[test]
    fn ampersand() {
        roundtrip("&", "&-");
        roundtrip("a&b&&", "a&-b&-&-");
        roundtrip("ä&ä", "&AOQ-&-&AOQ-");
    }

    #[test]
    fn german() {
        roundtrip("Entwürfe", "Entw&APw-rfe");
        roundtrip("ää", "&AOQA5A-");
        roundtrip("äöü", "&AOQA9gD8-");
    }

    #[test]
    fn plain_ascii() {
        roundtrip("", "");
        roundtrip("INBOX", "INBOX");
        roundtrip(" !\"#$%'()*+,-./~", " !\"#$%'()*+,-./~");
        roundtrip("a-b", "a-b");
        roundtrip("ä-", "&AOQ--");
    }

    #[test]
    fn controls_are_shifted() {
        roundtrip("\0", "&AAA-");
        roundtrip("a\tb", "a&AAk-b");
        roundtrip("\u{7f}", "&AH8-");
        roundtrip("\u{80}", "&AIA-");
    }

    #[test]
    fn supplementary_plane() {
        // U+1F600 is the surrogate pair D83D DE00.
        roundtrip("😀", "&2D3eAA-");
        roundtrip("x😀y", "x&2D3eAA-y");
        roundtrip("😀ä", "&2D3eAADk-");
        roundtrip("\u{10ffff}", "&2,,f,w-");
        roundtrip("\u{10000}", "&2ADcAA-");
    }

    #[test]
    fn cow_fast_paths_borrow() {
        assert!(matches!(
            encode_cow("INBOX/Sent"),
            Cow::Borrowed("INBOX/Sent")
        ));
        assert!(matches!(encode_cow("a&b"), Cow::Owned(_)));
        assert!(matches!(
            decode_cow(b"INBOX/Sent"),
            Ok(Cow::Borrowed("INBOX/Sent"))
        ));
        assert!(matches!(decode_cow(b"&-"), Ok(Cow::Owned(_))));
        let mut out = String::from("x:");
        encode_into("ä", &mut out);
        assert_eq!(out, "x:&AOQ-");
    }

    fn err(input: &str) -> Mutf7Error {
        match decode(input.as_bytes()) {
            Ok(s) => panic!("{input:?} decoded to {s:?}"),
            Err(e) => {
                assert!(!is_canonical(input.as_bytes()));
                e
            }
        }
    }

    #[test]
    fn rejects_non_printable_bytes() {
        assert_eq!(
            decode("Entwürfe".as_bytes()),
            Err(Mutf7Error::NonPrintable {
                offset: 4,
                byte: 0xc3
            })
        );
        assert_eq!(
            err("a\tb"),
            Mutf7Error::NonPrintable {
                offset: 1,
                byte: 0x09
            }
        );
        assert_eq!(
            err("a\u{7f}"),
            Mutf7Error::NonPrintable {
                offset: 1,
                byte: 0x7f
            }
        );
        assert_eq!(err("\0"), Mutf7Error::NonPrintable { offset: 0, byte: 0 });
        assert_eq!(
            err("\r\n"),
            Mutf7Error::NonPrintable {
                offset: 0,
                byte: b'\r'
            }
        );
    }

    #[test]
    fn rejects_unterminated_shift() {
        assert_eq!(err("&"), Mutf7Error::UnterminatedShift { offset: 0 });
        assert_eq!(err("ab&AOQ"), Mutf7Error::UnterminatedShift { offset: 2 });
        assert_eq!(err("&AOQA5A"), Mutf7Error::UnterminatedShift { offset: 0 });
    }

    #[test]
    fn rejects_bytes_outside_the_alphabet() {
        // '/' is plain base64 but not modified base64.
        assert_eq!(
            err("&U/BTFw-"),
            Mutf7Error::InvalidBase64 {
                offset: 2,
                byte: b'/'
            }
        );
        assert_eq!(
            err("&AOQ=-"),
            Mutf7Error::InvalidBase64 {
                offset: 4,
                byte: b'='
            }
        );
        assert_eq!(
            err("&AOQ "),
            Mutf7Error::InvalidBase64 {
                offset: 4,
                byte: b' '
            }
        );
        assert_eq!(
            err("&&-"),
            Mutf7Error::InvalidBase64 {
                offset: 1,
                byte: b'&'
            }
        );
        assert_eq!(
            err("&AO\u{e4}-"),
            Mutf7Error::InvalidBase64 {
                offset: 3,
                byte: 0xc3
            }
        );
    }

    #[test]
    fn rejects_non_zero_padding_bits() {
        // "&AOQ-" is U+00E4 with two zero padding bits; 'R' sets the lowest of them.
        assert_eq!(err("&AOR-"), Mutf7Error::NonZeroPadding { offset: 4 });
        // Two units leave four padding bits: "&AOQA5A-" is canonical, 'B' sets one.
        assert_eq!(err("&AOQA5B-"), Mutf7Error::NonZeroPadding { offset: 7 });
    }

    #[test]
    fn rejects_encoded_printable_ascii() {
        assert_eq!(
            err("&AGE-"),
            Mutf7Error::EncodedPrintable {
                offset: 3,
                unit: 0x61
            }
        );
        // '&' itself must be "&-", not a shift.
        assert_eq!(
            err("&ACY-"),
            Mutf7Error::EncodedPrintable {
                offset: 3,
                unit: 0x26
            }
        );
        assert_eq!(
            err("&ACA-"),
            Mutf7Error::EncodedPrintable {
                offset: 3,
                unit: 0x20
            }
        );
        // Also when mixed into a shift with a character that belongs there.
        assert_eq!(
            err("&AOQAYQ-"),
            Mutf7Error::EncodedPrintable {
                offset: 6,
                unit: 0x61
            }
        );
    }

    #[test]
    fn rejects_empty_shifts() {
        assert_eq!(err("&A-"), Mutf7Error::EmptyShift { offset: 0 });
        assert_eq!(err("x&AA-"), Mutf7Error::EmptyShift { offset: 1 });
    }

    #[test]
    fn rejects_adjacent_shifts() {
        assert_eq!(decode(b"&AOQA5A-"), Ok("ää".to_owned()));
        assert_eq!(err("&AOQ-&AOQ-"), Mutf7Error::AdjacentShifts { offset: 5 });
        // A literal '&' or '-' in between is fine.
        assert_eq!(decode(b"&AOQ-&-&AOQ-"), Ok("ä&ä".to_owned()));
        assert_eq!(decode(b"&AOQ--&AOQ-"), Ok("ä-ä".to_owned()));
    }

    #[test]
    fn rejects_unpaired_surrogates() {
        // A lone high surrogate (D83D) at the end of a shift.
        assert_eq!(
            err("&2D0-"),
            Mutf7Error::UnpairedHighSurrogate {
                offset: 3,
                unit: 0xd83d
            }
        );
        // A high surrogate followed by a non-surrogate (D83D 00E4).
        assert_eq!(
            err("&2D0A5A-"),
            Mutf7Error::UnpairedHighSurrogate {
                offset: 3,
                unit: 0xd83d
            }
        );
        // Two high surrogates (D83D D83D).
        assert_eq!(
            err("&2D3YPQ-"),
            Mutf7Error::UnpairedHighSurrogate {
                offset: 3,
                unit: 0xd83d
            }
        );
        // A lone low surrogate (DE00).
        assert_eq!(
            err("&3gA-"),
            Mutf7Error::UnpairedLowSurrogate {
                offset: 3,
                unit: 0xde00
            }
        );
        // A pair split over two shifts is adjacent shifts and an unpaired high surrogate.
        assert!(matches!(
            err("&2D0-&3gA-"),
            Mutf7Error::UnpairedHighSurrogate { unit: 0xd83d, .. }
        ));
    }

    #[test]
    fn rejects_reversed_surrogates() {
        // DE00 D83D: the pair of U+1F600 in the wrong order.
        assert_eq!(
            err("&3gDYPQ-"),
            Mutf7Error::UnpairedLowSurrogate {
                offset: 3,
                unit: 0xde00
            }
        );
    }

    #[test]
    fn rejects_leftover_partial_unit() {
        // One unit (18 bits used for 16) plus a superfluous character: 8 bits left over.
        assert_eq!(err("&AOQA-"), Mutf7Error::PartialUnit { offset: 5 });
        assert_eq!(err("&AOQAA-"), Mutf7Error::PartialUnit { offset: 6 });
        // Two units use 6 characters; a seventh leaves 10 bits.
        assert_eq!(err("&AOQA5AA-"), Mutf7Error::PartialUnit { offset: 8 });
    }

    #[test]
    fn error_offset_accessor_and_message() {
        let e = err("ab&AGE-");
        assert_eq!(e.offset(), 5);
        assert!(e.to_string().contains("U+0061"), "{e}");
    }

    /// A shift of arbitrary UTF-16 units (surrogates in any order and printable ASCII included)
    /// in modified base64 with zero padding bits, written independently of [`encode`].
    fn units_shift() -> impl Strategy<Value = Vec<u8>> {
        let unit = prop_oneof![
            4 => 0x80u16..0xd800,
            2 => 0xd800u16..0xe000,
            1 => 0u16..0x80,
            1 => any::<u16>(),
        ];
        prop::collection::vec(unit, 0..6).prop_map(|units| {
            let mut out = vec![b'&'];
            let (mut buf, mut bits) = (0u64, 0u32);
            for unit in units {
                buf = (buf << 16) | u64::from(unit);
                bits += 16;
                while bits >= 6 {
                    bits -= 6;
                    out.push(ALPHABET[((buf >> bits) & 0x3f) as usize]);
                }
            }
            if bits > 0 {
                out.push(ALPHABET[((buf << (6 - bits)) & 0x3f) as usize]);
            }
            out.push(b'-');
            out
        })
    }

    /// Bytes that look like modified UTF-7: literals, `&-`, `-`, well-formed shifts of arbitrary
    /// units, and shifts of random base64 (with a few bytes outside the alphabet), so that a
    /// useful share decodes and the rest fails close to the canonical form.
    fn mutf7_like() -> impl Strategy<Value = Vec<u8>> {
        let b64 = prop::sample::select(ALPHABET.to_vec());
        let random_shift = prop::collection::vec(
            prop_oneof![8 => b64, 1 => prop::sample::select(b"/=&\x00\xe4".to_vec())],
            0..12,
        )
        .prop_map(|mut body| {
            body.insert(0, b'&');
            body.push(b'-');
            body
        });
        let segment = prop_oneof![
            3 => (0x20u8..=0x7e).prop_map(|b| vec![b]),
            1 => Just(b"&-".to_vec()),
            1 => Just(b"-".to_vec()),
            4 => units_shift(),
            1 => random_shift,
            1 => any::<u8>().prop_map(|b| vec![b]),
        ];
        prop::collection::vec(segment, 0..8).prop_map(|segments| segments.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn decode_inverts_encode(s in any::<String>()) {
            let encoded = encode(&s);
            prop_assert!(encoded.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            prop_assert_eq!(decode(encoded.as_bytes()), Ok(s));
        }

        #[test]
        fn decode_inverts_encode_any_chars(chars in prop::collection::vec(any::<char>(), 0..24)) {
            let s: String = chars.into_iter().collect();
            prop_assert_eq!(decode(encode(&s).as_bytes()), Ok(s));
        }

        #[test]
        fn canonical_is_unique(bytes in mutf7_like()) {
            if let Ok(s) = decode(&bytes) {
                prop_assert_eq!(encode(&s).into_bytes(), bytes);
            }
        }

        #[test]
        fn canonical_is_unique_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(s) = decode(&bytes) {
                prop_assert_eq!(encode(&s).into_bytes(), bytes);
            }
        }
    }
}
