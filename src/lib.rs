#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![warn(missing_debug_implementations)]

pub mod approval;
pub mod atomic;
pub mod audit;
pub mod blocking;
pub mod cache;
pub mod cobblestone;
pub mod envelope;
mod error;
pub mod events;
pub mod file;
pub mod format;
mod json;
pub mod keyring;
pub mod message;
pub mod monitor;
pub mod policy;
pub mod primitives;
pub mod provider;
pub mod rewrap;
#[cfg(feature = "tokio")]
pub mod tokio_io;

pub use envelope::Envelope;
pub use error::{Error, Result};
pub use format::{EncryptionContext, Header, WrappedKey};
pub use keyring::{Caller, Keyring};
pub use primitives::Dek;
pub use provider::{KeyProvider, KeyRef};
