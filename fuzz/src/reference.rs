//! A reference Cobblestone-256 decoder (c2sp.org/chunked-encryption with
//! AEAD_AES_256_GCM and HKDF-Expand-SHA-512), written from the spec on
//! RustCrypto. It does not stop at the first bad chunk: it reports what
//! every chunk at its computed offset authenticates to, so that each of the
//! library's three decoders (one-shot, streaming, seeking) can be checked
//! against the exact semantics it promises.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha512;

pub const SALT_LEN: usize = 24;
pub const COMMITMENT_LEN: usize = 32;
pub const PREFIX_LEN: usize = SALT_LEN + COMMITMENT_LEN;
pub const CHUNK: usize = 16384;
pub const TAG: usize = 16;
pub const CHUNK_CT: usize = CHUNK + TAG;

const LABEL: &[u8] = b"c2sp.org/chunked-encryption@v1+";
const AEAD_NAME: &[u8] = b"AEAD_AES_256_GCM";

/// HKDF-Expand-SHA-512 with `prk` used directly as the PRK (RFC 5869 2.3).
fn hkdf_expand(prk: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut prev: Vec<u8> = Vec::new();
    let mut i = 1u8;
    while out.len() < len {
        let mut mac = <Hmac<Sha512> as Mac>::new_from_slice(prk).expect("any key length");
        mac.update(&prev);
        mac.update(info);
        mac.update(&[i]);
        prev = mac.finalize().into_bytes().to_vec();
        out.extend_from_slice(&prev);
        i += 1;
    }
    out.truncate(len);
    out
}

/// How the library must answer, by kind (see [`crate::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    Truncated,
    /// The final chunk failed after at least one full chunk, and every
    /// chunk before it, authenticated (docs/FORMAT.md section 7.4).
    TruncatedChunk,
    Decrypt,
}

impl Fail {
    pub fn name(self) -> &'static str {
        match self {
            Fail::Truncated => "truncated",
            Fail::TruncatedChunk => "truncated-chunk",
            Fail::Decrypt => "decrypt",
        }
    }
}

/// What a body authenticates to, chunk by chunk.
#[derive(Debug)]
pub struct Reference {
    /// The body is shorter than salt and commitment.
    pub short: bool,
    /// The commitment matched (false when `short`).
    pub commitment_ok: bool,
    /// Number of full (16400-byte) encrypted chunks.
    pub full: usize,
    /// Bytes after the full chunks (the encrypted final chunk when >= 16).
    pub tail: usize,
    /// Plaintext of every chunk that authenticated under its index: the full
    /// chunks, then the final chunk when `tail >= 16`. Empty when the
    /// commitment failed.
    pub chunks: Vec<Option<Vec<u8>>>,
}

impl Reference {
    /// Decodes `body` under `key` (32 bytes) and `context`.
    pub fn new(key: &[u8; 32], context: &[u8], body: &[u8]) -> Reference {
        if body.len() < PREFIX_LEN {
            return Reference {
                short: true,
                commitment_ok: false,
                full: 0,
                tail: 0,
                chunks: Vec::new(),
            };
        }
        let ct = &body[PREFIX_LEN..];
        let full = ct.len() / CHUNK_CT;
        let tail = ct.len() % CHUNK_CT;
        let salt = &body[..SALT_LEN];
        let info = [LABEL, AEAD_NAME, &[0u8], salt, context].concat();
        let okm = hkdf_expand(key, &info, 32 + 12 + 32);
        let commitment_ok = okm[44..] == body[SALT_LEN..PREFIX_LEN];
        let mut chunks = Vec::new();
        if commitment_ok {
            let aead = Aes256Gcm::new_from_slice(&okm[..32]).expect("32-byte key");
            let count = full + usize::from(tail >= TAG);
            for i in 0..count {
                let start = i * CHUNK_CT;
                let end = (start + CHUNK_CT).min(ct.len());
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(&okm[32..44]);
                for (b, c) in nonce[4..].iter_mut().zip((i as u64).to_be_bytes()) {
                    *b ^= c;
                }
                let pt = aead
                    .decrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &ct[start..end],
                            aad: b"",
                        },
                    )
                    .ok();
                chunks.push(pt);
            }
        }
        Reference {
            short: false,
            commitment_ok,
            full,
            tail,
            chunks,
        }
    }

    /// True when the chunk layout is one a body can have.
    pub fn layout_ok(&self) -> bool {
        !self.short && self.tail >= TAG
    }

    /// The whole plaintext, when every chunk authenticated.
    pub fn plaintext(&self) -> Option<Vec<u8>> {
        if !self.layout_ok() || !self.commitment_ok {
            return None;
        }
        let mut out = Vec::new();
        for c in &self.chunks {
            out.extend_from_slice(c.as_ref()?);
        }
        Some(out)
    }

    /// How a failing final chunk (index `self.full`) is reported: after a
    /// full chunk authenticated it reads as a copy cut inside it.
    fn final_fail(&self) -> Fail {
        if self.full > 0 {
            Fail::TruncatedChunk
        } else {
            Fail::Decrypt
        }
    }

    /// The one-shot decoder's answer. Every decoder reports the first
    /// defect in stream order (docs/FORMAT.md section 7.3), so this is how
    /// the streaming decoder ends.
    pub fn one_shot(&self) -> Result<Vec<u8>, Fail> {
        let s = self.stream();
        s.opens?;
        s.end.map(|()| s.released)
    }

    /// The streaming decoder's answer: the plaintext it may release (chunks
    /// in order up to the first failure) and how it ends. `Err` in the
    /// second field with an empty first field and `opened == false` means
    /// the constructor itself fails.
    pub fn stream(&self) -> Streamed {
        if self.short {
            return Streamed {
                opens: Err(Fail::Truncated),
                released: Vec::new(),
                end: Err(Fail::Truncated),
            };
        }
        if !self.commitment_ok {
            return Streamed {
                opens: Err(Fail::Decrypt),
                released: Vec::new(),
                end: Err(Fail::Decrypt),
            };
        }
        let mut released = Vec::new();
        for c in &self.chunks[..self.full] {
            match c {
                Some(pt) => released.extend_from_slice(pt),
                None => {
                    return Streamed {
                        opens: Ok(()),
                        released,
                        end: Err(Fail::Decrypt),
                    }
                }
            }
        }
        let end = if self.tail < TAG {
            Err(Fail::Truncated)
        } else {
            match &self.chunks[self.full] {
                Some(pt) => {
                    released.extend_from_slice(pt);
                    Ok(())
                }
                None => Err(self.final_fail()),
            }
        };
        Streamed {
            opens: Ok(()),
            released,
            end,
        }
    }

    /// Whether the seeking decoder's constructor succeeds: it
    /// authenticates the final chunk first, but reports failures in stream
    /// order (a full chunk that fails comes before a missing or failing
    /// final chunk).
    pub fn seekable_opens(&self) -> Result<(), Fail> {
        if self.short {
            return Err(Fail::Truncated);
        }
        if !self.commitment_ok {
            return Err(Fail::Decrypt);
        }
        if self.tail >= TAG && self.chunks[self.full].is_some() {
            return Ok(());
        }
        if self.chunks[..self.full].iter().any(Option::is_none) {
            return Err(Fail::Decrypt);
        }
        Err(if self.tail < TAG {
            Fail::Truncated
        } else {
            self.final_fail()
        })
    }

    /// The authenticated plaintext length (valid layout only).
    pub fn plaintext_len(&self) -> u64 {
        (self.full * CHUNK + self.tail - TAG) as u64
    }

    /// The plaintext of chunk `i`, if it authenticated.
    pub fn chunk(&self, i: usize) -> Option<&[u8]> {
        self.chunks.get(i).and_then(|c| c.as_deref())
    }
}

/// See [`Reference::stream`].
#[derive(Debug)]
pub struct Streamed {
    /// Whether `Decryptor::new` succeeds.
    pub opens: Result<(), Fail>,
    /// Every byte the decryptor may release, in order.
    pub released: Vec<u8>,
    /// How reading ends.
    pub end: Result<(), Fail>,
}
