//! Lowercase hex without data-dependent branches or table lookups (it
//! encodes and decodes key bytes).

/// Writes `2 * bytes.len()` lowercase hex digits into `out`.
pub(super) fn encode_into(bytes: &[u8], out: &mut [u8]) {
    assert_eq!(out.len(), 2 * bytes.len());
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = digit(b >> 4);
        o[1] = digit(b & 0x0f);
    }
}

/// Lowercase hex of `bytes` (for values that are not secret).
pub(super) fn encode(bytes: &[u8]) -> String {
    let mut out = vec![0u8; 2 * bytes.len()];
    encode_into(bytes, &mut out);
    String::from_utf8(out).expect("hex is ASCII")
}

/// Decodes exactly `out.len()` bytes from lowercase hex; `false` (and
/// `out` zeroed) on a wrong length or any other character, uppercase
/// included, so that every value has exactly one encoding.
pub(super) fn decode_into(text: &[u8], out: &mut [u8]) -> bool {
    if text.len() != 2 * out.len() {
        out.fill(0);
        return false;
    }
    let mut ok = 0xffu8;
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (hi, hi_ok) = value(pair[0]);
        let (lo, lo_ok) = value(pair[1]);
        ok &= hi_ok & lo_ok;
        *o = (hi << 4) | lo;
    }
    if ok != 0xff {
        out.fill(0);
        return false;
    }
    true
}

/// Decodes lowercase hex of any even length (for values that are not secret).
pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let mut out = vec![0u8; text.len() / 2];
    decode_into(text.as_bytes(), &mut out).then_some(out)
}

/// The hex digit of a nibble: `'0' + n`, plus `'a' - '0' - 10` when n > 9.
fn digit(n: u8) -> u8 {
    let n = i16::from(n);
    (n + 0x30 + (((9 - n) >> 8) & 0x27)) as u8
}

/// The value of a lowercase hex digit and an all-ones mask when valid.
fn value(c: u8) -> (u8, u8) {
    let d = c.wrapping_sub(b'0');
    let l = c.wrapping_sub(b'a');
    let is_d = ((i16::from(d) - 10) >> 8) as u8;
    let is_l = ((i16::from(l) - 6) >> 8) as u8;
    ((d & is_d) | (l.wrapping_add(10) & is_l), is_d | is_l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_hex_crate() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(encode(&all), ::hex::encode(&all));
        assert_eq!(decode(&::hex::encode(&all)).unwrap(), all);
    }

    #[test]
    fn rejects_everything_but_lowercase_hex() {
        for c in 0..=255u8 {
            let valid = c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
            let mut out = [0u8; 1];
            assert_eq!(decode_into(&[b'0', c], &mut out), valid, "{c}");
            assert_eq!(decode_into(&[c, b'0'], &mut out), valid, "{c}");
        }
        assert!(decode("abc").is_none());
        assert!(decode("AB").is_none());
        let mut out = [7u8; 2];
        assert!(!decode_into(b"00zz", &mut out));
        assert_eq!(out, [0, 0]);
    }
}
