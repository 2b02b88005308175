//! The v1 wire format: header encoding and decoding, the canonical encryption
//! context, and the body context that binds them (with the optional
//! associated data). Pure: no I/O beyond the
//! `Read` it is given, no key providers. Every length read from input is
//! bounded before anything is allocated.
//!
//! The byte-level specification is `docs/FORMAT.md`.

mod context;
mod header;

pub use context::{
    EncryptionContext, MAX_CONTEXT_ENCODED_LEN, MAX_CONTEXT_KEY_LEN, MAX_CONTEXT_PAIRS,
    MAX_CONTEXT_VALUE_LEN,
};
pub(crate) use header::{header_tag_key, read_full};
pub use header::{
    Header, Suite, WrappedKey, FIXED_PREFIX_LEN, HEADER_TAG_LEN, MAGIC, MAX_HEADER_LEN,
    MAX_KEY_REF_LEN, MAX_PROVIDER_ID_LEN, MAX_RECIPIENTS, MAX_WRAPPED_KEY_LEN, VERSION,
};

/// The Cobblestone `context` of a message body: `MAGIC || version || suite ||
/// canonical pairs`. It binds what must never change for the life of the
/// message; the wrapped keys are not in it, so rewrap never touches the body.
///
/// This is the body context of a message without associated data; see
/// [`body_context_with_ad`] for the other case.
pub fn body_context(suite: Suite, ctx: &EncryptionContext) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + 2 + 64);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(suite.id());
    ctx.write_canonical_pairs(&mut out);
    out
}

/// Most bytes of associated data a message may be bound to.
pub const MAX_ASSOCIATED_DATA_LEN: usize = 65536;

/// The marker byte that introduces associated data in a body context
/// (docs/FORMAT.md, section 5.4).
pub const ASSOCIATED_DATA_MARKER: u8 = 0x01;

/// Refuses associated data over [`MAX_ASSOCIATED_DATA_LEN`] bytes with
/// [`Error::InvalidAssociatedData`](crate::Error::InvalidAssociatedData).
/// The error never repeats the data.
pub fn check_associated_data(ad: &[u8]) -> crate::Result<()> {
    if ad.len() > MAX_ASSOCIATED_DATA_LEN {
        return Err(crate::Error::InvalidAssociatedData(
            "longer than 65536 bytes",
        ));
    }
    Ok(())
}

/// The Cobblestone `context` of a message body bound to associated data
/// `ad` as well as to the encryption context: [`body_context`], followed,
/// only when `ad` is not empty, by `0x01 || u32(len(ad)) || ad`
/// (docs/FORMAT.md, section 5.4). Empty associated data is no associated
/// data: the result is then exactly [`body_context`].
///
/// Associated data longer than [`MAX_ASSOCIATED_DATA_LEN`] is
/// [`Error::InvalidAssociatedData`](crate::Error::InvalidAssociatedData).
pub fn body_context_with_ad(
    suite: Suite,
    ctx: &EncryptionContext,
    ad: &[u8],
) -> crate::Result<Vec<u8>> {
    check_associated_data(ad)?;
    let mut out = body_context(suite, ctx);
    if !ad.is_empty() {
        out.reserve(1 + 4 + ad.len());
        out.push(ASSOCIATED_DATA_MARKER);
        // Bounded above, so the cast cannot truncate.
        out.extend_from_slice(&(ad.len() as u32).to_be_bytes());
        out.extend_from_slice(ad);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE: Suite = Suite::Aes256GcmHkdfSha512;

    #[test]
    fn empty_associated_data_is_the_plain_body_context() {
        let ctx = EncryptionContext::from_pairs([("tenant", "st-mary")]).unwrap();
        assert_eq!(
            body_context_with_ad(SUITE, &ctx, b"").unwrap(),
            body_context(SUITE, &ctx)
        );
    }

    #[test]
    fn associated_data_field_layout_and_limit() {
        let ctx = EncryptionContext::new();
        let got = body_context_with_ad(SUITE, &ctx, b"42").unwrap();
        assert_eq!(got, b"PHIENV\x01\x01\x00\x00\x01\x00\x00\x00\x0242");
        let max = vec![0xA5; MAX_ASSOCIATED_DATA_LEN];
        let got = body_context_with_ad(SUITE, &ctx, &max).unwrap();
        assert_eq!(got[10..15], [0x01, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(got.len(), 10 + 5 + MAX_ASSOCIATED_DATA_LEN);
        let over = vec![0xA5; MAX_ASSOCIATED_DATA_LEN + 1];
        assert!(matches!(
            body_context_with_ad(SUITE, &ctx, &over),
            Err(crate::Error::InvalidAssociatedData(_))
        ));
    }

    /// Contexts and associated data that could be confused by a careless
    /// encoding give distinct body contexts.
    #[test]
    fn context_and_associated_data_do_not_collide() {
        let pairs = |p: &[(&str, &str)]| EncryptionContext::from_pairs(p.iter().copied()).unwrap();
        let with_id = pairs(&[("id", "7")]);
        let cases: Vec<(EncryptionContext, Vec<u8>)> = vec![
            (EncryptionContext::new(), Vec::new()),
            (EncryptionContext::new(), vec![0]),
            (EncryptionContext::new(), vec![1]),
            (EncryptionContext::new(), with_id.canonical_pairs()),
            (with_id.clone(), Vec::new()),
            (with_id.clone(), b"7".to_vec()),
            (pairs(&[("id", "")]), b"7".to_vec()),
            (pairs(&[("id", "7\x01")]), Vec::new()),
            (EncryptionContext::new(), b"\x00\x00\x00\x017".to_vec()),
        ];
        let encoded: std::collections::BTreeSet<Vec<u8>> = cases
            .iter()
            .map(|(c, ad)| body_context_with_ad(SUITE, c, ad).unwrap())
            .collect();
        assert_eq!(encoded.len(), cases.len());
    }
}
