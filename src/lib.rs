#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![warn(missing_debug_implementations)]

pub mod cobblestone;
mod error;
pub mod format;
pub mod message;
pub mod primitives;

pub use error::{Error, Result};
pub use format::{EncryptionContext, Header, WrappedKey};
pub use primitives::Dek;
