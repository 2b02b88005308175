//! Readers and read sizes chosen by the fuzzer.

use std::io::{self, Read, Seek, SeekFrom};

/// A cycle of sizes drawn from fuzzer bytes. Each byte `b` maps to a size:
/// `0` is special (an `Interrupted` error for [`Pieces`], one byte
/// otherwise), `1..=63` is itself, `64..=127` is `(b - 63) * 256` (up to a
/// chunk), `128..=255` is `(b - 127) * 1024` (several chunks).
#[derive(Clone, Debug)]
pub struct Schedule {
    codes: Vec<u8>,
    i: usize,
}

impl Schedule {
    pub fn new(codes: &[u8]) -> Schedule {
        Schedule {
            codes: codes.to_vec(),
            i: 0,
        }
    }

    /// The next raw code (`None` when the schedule is empty: take all).
    pub fn next_code(&mut self) -> Option<u8> {
        if self.codes.is_empty() {
            return None;
        }
        let c = self.codes[self.i % self.codes.len()];
        self.i = self.i.wrapping_add(1);
        Some(c)
    }

    /// The next size, at least 1.
    pub fn next_size(&mut self) -> usize {
        match self.next_code() {
            None => usize::MAX,
            Some(c) => size_of(c),
        }
    }
}

pub fn size_of(c: u8) -> usize {
    match c {
        0 => 1,
        1..=63 => c as usize,
        64..=127 => (c as usize - 63) * 256,
        _ => (c as usize - 127) * 1024,
    }
}

/// A reader (and seeker) over `data` that returns at most the scheduled
/// number of bytes per call, and an `Interrupted` error for a `0` code
/// (never twice in a row, so a retrying caller always makes progress).
pub struct Pieces<'a> {
    data: &'a [u8],
    pos: usize,
    schedule: Schedule,
    interrupted: bool,
}

impl<'a> Pieces<'a> {
    pub fn new(data: &'a [u8], codes: &[u8]) -> Pieces<'a> {
        Pieces {
            data,
            pos: 0,
            schedule: Schedule::new(codes),
            interrupted: false,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let code = self.schedule.next_code();
        if code == Some(0) && !self.interrupted {
            self.interrupted = true;
            return Err(io::Error::new(io::ErrorKind::Interrupted, "fuzz"));
        }
        self.interrupted = false;
        let size = code.map_or(usize::MAX, size_of);
        let rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest.len().min(buf.len()).min(size);
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Seek for Pieces<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = self.data.len() as i128;
        let target = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if target < 0 || target > u32::MAX as i128 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad seek"));
        }
        self.pos = target as usize;
        Ok(target as u64)
    }
}

/// Reads `r` to its end or its first error with read sizes from `schedule`;
/// returns what was read and the error, if any. After an error it reads once
/// more and requires a second error (decryptors fail for good).
pub fn drain<R: Read>(r: &mut R, schedule: &mut Schedule) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 3 * 16384 + 100];
    loop {
        let want = schedule.next_size().min(buf.len());
        match r.read(&mut buf[..want]) {
            Ok(0) => return (out, None),
            Ok(n) => {
                assert!(n <= want, "read returned more than asked");
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                panic!("a decryptor must not pass Interrupted on: {e}")
            }
            Err(e) => {
                let again = r.read(&mut buf[..1]);
                assert!(again.is_err(), "a failed decryptor read again: {again:?}");
                let again = r.read(&mut buf[..]);
                assert!(again.is_err(), "a failed decryptor read again: {again:?}");
                return (out, Some(e));
            }
        }
    }
}
