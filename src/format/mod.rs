//! The v1 wire format: header encoding and decoding, the canonical encryption
//! context, and the body context that binds them. Pure: no I/O beyond the
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
pub fn body_context(suite: Suite, ctx: &EncryptionContext) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + 2 + 64);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(suite.id());
    ctx.write_canonical_pairs(&mut out);
    out
}
