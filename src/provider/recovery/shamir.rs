//! Shamir's secret sharing over GF(2^8), byte by byte.
//!
//! The field is GF(2)[x] / (x^8 + x^4 + x^3 + x + 1) (0x11b, the AES
//! field). Share `i` (1 ..= 255) of a secret `s` is, for every byte
//! position `b`, `y[b] = f_b(i)` with `f_b(x) = s[b] + c_1[b] x + ... +
//! c_{M-1}[b] x^{M-1}` and uniformly random coefficients. Any `M` shares
//! give `s` by Lagrange interpolation at `x = 0`; fewer than `M` are
//! consistent with every possible secret, so they say nothing about it.
//!
//! Multiplication and inversion run in constant time (no tables, no
//! branches on data): the share values and coefficients are secret. The
//! share indices are public.

use zeroize::Zeroizing;

/// Length of the shared secret in bytes.
pub(crate) const SECRET_LEN: usize = 32;

pub(crate) type Bytes32 = Zeroizing<[u8; SECRET_LEN]>;

/// Multiplication in GF(2^8), constant time.
pub(crate) fn gf_mul(a: u8, b: u8) -> u8 {
    let (mut a, mut b, mut p) = (a, b, 0u8);
    for _ in 0..8 {
        p ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// Inverse in GF(2^8) (`a^254`), constant time; 0 maps to 0.
pub(crate) fn gf_inv(a: u8) -> u8 {
    // a^254 = a^(2+4+8+16+32+64+128)
    let mut result = 1u8;
    let mut power = a;
    for _ in 0..7 {
        power = gf_mul(power, power);
        result = gf_mul(result, power);
    }
    result
}

/// The share values `f(x)` for every byte position, given the secret and
/// the `M - 1` coefficient vectors (`coefficients[j - 1][b]` is `c_j[b]`).
pub(crate) fn evaluate(secret: &[u8; SECRET_LEN], coefficients: &[Bytes32], x: u8) -> Bytes32 {
    let mut y = Zeroizing::new([0u8; SECRET_LEN]);
    for b in 0..SECRET_LEN {
        // Horner: ((c_{M-1} x + c_{M-2}) x + ...) x + s.
        let mut acc = 0u8;
        for c in coefficients.iter().rev() {
            acc = gf_mul(acc, x) ^ c[b];
        }
        y[b] = gf_mul(acc, x) ^ secret[b];
    }
    y
}

/// `f(0)` from the points `(x_i, y_i)`: Lagrange interpolation. The `x_i`
/// must be distinct and non-zero (the caller checks).
pub(crate) fn interpolate(points: &[(u8, &[u8; SECRET_LEN])]) -> Bytes32 {
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    for (i, &(xi, yi)) in points.iter().enumerate() {
        // l_i(0) = prod_{j != i} x_j / (x_j - x_i); subtraction is XOR.
        let mut num = 1u8;
        let mut den = 1u8;
        for (j, &(xj, _)) in points.iter().enumerate() {
            if i != j {
                num = gf_mul(num, xj);
                den = gf_mul(den, xj ^ xi);
            }
        }
        let li = gf_mul(num, gf_inv(den));
        for b in 0..SECRET_LEN {
            secret[b] ^= gf_mul(li, yi[b]);
        }
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference multiplication: carry-less product reduced bit by bit.
    fn slow_mul(a: u8, b: u8) -> u8 {
        let mut p: u16 = 0;
        for i in 0..8 {
            if b >> i & 1 == 1 {
                p ^= (a as u16) << i;
            }
        }
        for i in (8..16).rev() {
            if p >> i & 1 == 1 {
                p ^= 0x11b << (i - 8);
            }
        }
        p as u8
    }

    #[test]
    fn field_arithmetic() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(gf_mul(a, b), slow_mul(a, b), "{a} * {b}");
            }
            if a != 0 {
                assert_eq!(gf_mul(a, gf_inv(a)), 1, "inverse of {a}");
            }
        }
        assert_eq!(gf_inv(0), 0);
        // FIPS 197, section 4.2: {57} * {83} = {c1}.
        assert_eq!(gf_mul(0x57, 0x83), 0xc1);
    }

    fn bytes(seed: u8) -> Bytes32 {
        let mut b = Zeroizing::new([0u8; SECRET_LEN]);
        for (i, v) in b.iter_mut().enumerate() {
            *v = (i as u8).wrapping_mul(37).wrapping_add(seed);
        }
        b
    }

    #[test]
    fn any_threshold_subset_restores() {
        let secret = bytes(9);
        let coefficients = vec![bytes(1), bytes(2)]; // M = 3
        let shares: Vec<(u8, Bytes32)> = (1..=5u8)
            .map(|x| (x, evaluate(&secret, &coefficients, x)))
            .collect();
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let pts = [
                        (shares[a].0, &*shares[a].1),
                        (shares[b].0, &*shares[b].1),
                        (shares[c].0, &*shares[c].1),
                    ];
                    assert_eq!(*interpolate(&pts), *secret);
                }
            }
        }
        // All five (more than M) give the same secret.
        let all: Vec<(u8, &[u8; 32])> = shares.iter().map(|(x, y)| (*x, &**y)).collect();
        assert_eq!(*interpolate(&all), *secret);
        // Two (M - 1) give something else.
        assert_ne!(*interpolate(&all[..2]), *secret);
    }

    #[test]
    fn fewer_than_threshold_shares_fit_every_secret() {
        // M = 2: for one share (x, y) and ANY candidate secret s', the
        // coefficient c = (y - s') / x makes a polynomial through (x, y)
        // with f(0) = s'. So one share is equally consistent with all 256
        // values of each byte: it reveals nothing.
        let secret = bytes(3);
        let c = bytes(200);
        let y = evaluate(&secret, std::slice::from_ref(&c), 7);
        for candidate in 0..=255u8 {
            let coef = gf_mul(y[0] ^ candidate, gf_inv(7));
            assert_eq!(gf_mul(coef, 7) ^ candidate, y[0]);
        }
    }
}
