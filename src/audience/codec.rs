//! The stored audience's binary form, version 2:
//!
//! ```text
//! "BZXA"  version (1 byte)  header length (u32 LE)  header (JSON)  CRC-32 of the header (u32 LE)  body (zlib)
//! body, once inflated:  member*  0xFF  count (varint)
//! member:               state (1 byte: 0 flagged, 1 pending)  fingerprint (u32 LE)  length (varint)  identifier
//! ```
//!
//! Version 1, still read, has no fingerprint (read as 0, unknown: a delta run sends the
//! user once more).
//!
//! The header is small and uncompressed (with its own checksum), so the owner can be checked
//! without inflating the body. The body is one zlib stream (its Adler-32 catches
//! corruption), written and read one member at a time: a million members never need to be
//! held as strings. The end marker and the count catch a truncated body.

use std::io::{self, Read, Write};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

use super::header::{Header, MemberState};

/// First bytes of every stored audience.
pub const MAGIC: &[u8; 4] = b"BZXA";
/// The version this build writes.
pub const VERSION: u8 = 2;
/// The oldest version this build reads.
pub const OLDEST_VERSION: u8 = 1;
/// Longest identifier a body may hold: Braze's 987 bytes, with room to spare. Longer
/// lengths mean corruption, and are refused before anything is allocated.
pub const MAX_ID_BYTES: usize = 4096;
/// Longest header.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const END: u8 = 0xFF;

/// Writes members into a compressed body, in memory.
pub struct BodyWriter {
    zlib: ZlibEncoder<Vec<u8>>,
    /// Members not yet compressed: the compressor is fed in large slices (one call per
    /// member would cost more than the compression itself).
    staged: Vec<u8>,
    count: u64,
}

/// Bytes staged before they are compressed.
const STAGE_BYTES: usize = 64 * 1024;

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWriter")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl BodyWriter {
    /// A body compressed at `level` (0 to 9; 1 is fast, 6 the usual balance).
    pub fn new(level: u32) -> Self {
        Self {
            zlib: ZlibEncoder::new(Vec::new(), Compression::new(level.min(9))),
            staged: Vec::with_capacity(STAGE_BYTES + MAX_ID_BYTES + 15),
            count: 0,
        }
    }

    /// Appends one member with the fingerprint of what was sent for it (0: unknown).
    /// Writing into memory cannot fail; identifiers longer than [`MAX_ID_BYTES`] are cut
    /// (none is: the pipeline refuses ids over 987 bytes).
    pub fn push(&mut self, id: &str, state: MemberState, fingerprint: u32) {
        let bytes = &id.as_bytes()[..id.len().min(MAX_ID_BYTES)];
        let mut head = [0u8; 15];
        head[0] = state as u8;
        head[1..5].copy_from_slice(&fingerprint.to_le_bytes());
        let n = 5 + varint(bytes.len() as u64, &mut head[5..]);
        self.staged.extend_from_slice(&head[..n]);
        self.staged.extend_from_slice(bytes);
        self.count += 1;
        if self.staged.len() >= STAGE_BYTES {
            self.compress_staged();
        }
    }

    fn compress_staged(&mut self) {
        // Writing into a Vec cannot fail.
        let _ = self.zlib.write_all(&self.staged);
        self.staged.clear();
    }

    /// Members written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// At most the bytes the body would take if finished now (less the trailer's few).
    pub fn len_bound(&self) -> usize {
        self.zlib.get_ref().len() + self.staged.len()
    }

    /// Ends the body: the end marker, the count, and the zlib trailer.
    pub fn finish(mut self) -> (Vec<u8>, u64) {
        let mut tail = [0u8; 11];
        tail[0] = END;
        let n = 1 + varint(self.count, &mut tail[1..]);
        self.staged.extend_from_slice(&tail[..n]);
        self.compress_staged();
        let body = self.zlib.finish().unwrap_or_default();
        (body, self.count)
    }
}

/// The bytes before the body: magic, version, header length and header.
pub fn header_bytes(header: &Header) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + 13);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out
}

/// Reads the magic, version and header from the start of a stored audience: the header and
/// the body's version.
pub fn read_header(r: &mut impl Read) -> Result<(Header, u8), AudienceError> {
    let mut magic = [0u8; 5];
    r.read_exact(&mut magic)
        .map_err(|_| AudienceError::NotAnAudience)?;
    if &magic[..4] != MAGIC {
        return Err(AudienceError::NotAnAudience);
    }
    let version = magic[4];
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(AudienceError::UnsupportedVersion(version));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .map_err(|_| corrupt("the header is cut short"))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HEADER_BYTES {
        return Err(corrupt("the header length is out of range"));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json)
        .map_err(|_| corrupt("the header is cut short"))?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc)
        .map_err(|_| corrupt("the header is cut short"))?;
    if u32::from_le_bytes(crc) != crc32fast::hash(&json) {
        return Err(corrupt("the header's checksum does not match"));
    }
    let header = serde_json::from_slice(&json)
        .map_err(|e| corrupt(&format!("the header is not valid: {e}")))?;
    Ok((header, version))
}

/// The fingerprint of what is sent for a user: the CRC-32 of the object's bytes (identifier
/// type and value, attributes and their values, the flag), never 0 (0 means unknown).
pub fn fingerprint(object_bytes: &[u8]) -> u32 {
    crc32fast::hash(object_bytes).max(1)
}

/// Reads the members of a body one at a time, checking the end marker and the count.
pub struct BodyReader<R: Read> {
    zlib: io::BufReader<ZlibDecoder<R>>,
    id: Vec<u8>,
    read: u64,
    done: bool,
    fingerprints: bool,
}

impl<R: Read> BodyReader<R> {
    /// Reads a body of `version` that `r` yields (positioned just after the header).
    pub fn new(r: R, version: u8) -> Self {
        Self {
            zlib: io::BufReader::with_capacity(64 * 1024, ZlibDecoder::new(r)),
            id: Vec::with_capacity(64),
            read: 0,
            done: false,
            fingerprints: version >= 2,
        }
    }

    /// The next member (identifier, state, fingerprint), `None` after the last one. Any
    /// corruption, truncation or trailing data is an error; nothing panics.
    pub fn next_member(&mut self) -> Result<Option<(&str, MemberState, u32)>, AudienceError> {
        Ok(self.advance()?.map(|(state, fp)| (self.id(), state, fp)))
    }

    /// The identifier of the member [`BodyReader::advance`] read last.
    pub fn id(&self) -> &str {
        std::str::from_utf8(&self.id).unwrap_or_default()
    }

    /// Reads the next member: its state and fingerprint, the identifier left in
    /// [`BodyReader::id`].
    pub fn advance(&mut self) -> Result<Option<(MemberState, u32)>, AudienceError> {
        if self.done {
            return Ok(None);
        }
        let state = match self.byte()? {
            0 => MemberState::Flagged,
            1 => MemberState::Pending,
            END => {
                let count = self.varint()?;
                if count != self.read {
                    return Err(corrupt(&format!(
                        "the body holds {} members but says {count}",
                        self.read
                    )));
                }
                let mut rest = [0u8; 1];
                match self.zlib.read(&mut rest) {
                    Ok(0) => {}
                    Ok(_) => return Err(corrupt("data follows the end of the body")),
                    Err(e) => return Err(corrupt(&format!("the body is damaged ({e})"))),
                }
                self.done = true;
                return Ok(None);
            }
            other => return Err(corrupt(&format!("unknown member state {other}"))),
        };
        let mut fingerprint = [0u8; 4];
        if self.fingerprints {
            self.zlib
                .read_exact(&mut fingerprint)
                .map_err(|e| cut_or_damaged(&e))?;
        }
        let len = self.varint()?;
        if len == 0 || len > MAX_ID_BYTES as u64 {
            return Err(corrupt("an identifier length is out of range"));
        }
        self.id.resize(len as usize, 0);
        self.zlib
            .read_exact(&mut self.id)
            .map_err(|e| cut_or_damaged(&e))?;
        std::str::from_utf8(&self.id).map_err(|_| corrupt("an identifier is not UTF-8"))?;
        self.read += 1;
        Ok(Some((state, u32::from_le_bytes(fingerprint))))
    }

    fn byte(&mut self) -> Result<u8, AudienceError> {
        let mut b = [0u8; 1];
        self.zlib
            .read_exact(&mut b)
            .map_err(|e| cut_or_damaged(&e))?;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, AudienceError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(corrupt("a number is too long"))
    }
}

fn cut_or_damaged(e: &io::Error) -> AudienceError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt("the body is cut short")
    } else {
        corrupt(&format!("the body is damaged ({e})"))
    }
}

fn corrupt(why: &str) -> AudienceError {
    AudienceError::Corrupt(why.to_owned())
}

/// LEB128: writes `n` into `out`, returns the bytes used (at most 10).
fn varint(mut n: u64, out: &mut [u8]) -> usize {
    let mut i = 0;
    loop {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out[i] = b;
            return i + 1;
        }
        out[i] = b | 0x80;
        i += 1;
    }
}

/// Why a stored audience cannot be used. Never names a user.
#[derive(Debug, thiserror::Error)]
pub enum AudienceError {
    /// The bytes do not start as an audience does.
    #[error("it is not a stored audience (the first bytes are not BZXA)")]
    NotAnAudience,
    /// Written by a newer build.
    #[error("it is of version {0}, and this build reads versions {OLDEST_VERSION} to {VERSION}")]
    UnsupportedVersion(u8),
    /// Damaged or cut short.
    #[error("it is damaged: {0}")]
    Corrupt(String),
    /// It could not be read or written.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// It could not be sorted through the scratch directory ([`crate::spill`]).
    #[error("{0}")]
    Scratch(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for n in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::MAX] {
            let mut buf = [0u8; 10];
            let used = varint(n, &mut buf);
            let mut w = BodyWriter::new(1);
            w.count = n;
            let (body, _) = w.finish();
            let mut r = BodyReader::new(&body[..], VERSION);
            r.read = n;
            assert!(r.next_member().unwrap().is_none(), "{n}");
            assert!(used <= 10);
        }
    }

    #[test]
    fn members_round_trip_with_their_state() {
        let mut w = BodyWriter::new(6);
        w.push("u1", MemberState::Flagged, 7);
        w.push("é-2", MemberState::Pending, 0);
        w.push(&"x".repeat(987), MemberState::Flagged, u32::MAX);
        let (body, count) = w.finish();
        assert_eq!(count, 3);
        let mut r = BodyReader::new(&body[..], VERSION);
        let mut got = Vec::new();
        while let Some((id, state, fp)) = r.next_member().unwrap() {
            got.push((id.len(), state, fp));
        }
        assert_eq!(
            got,
            [
                (2, MemberState::Flagged, 7),
                (4, MemberState::Pending, 0),
                (987, MemberState::Flagged, u32::MAX)
            ]
        );
        assert!(r.next_member().unwrap().is_none());
    }
}
