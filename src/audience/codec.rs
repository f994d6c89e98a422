//! The stored audience's binary form, version 3:
//!
//! ```text
//! "BZXA"  version (1 byte)  header length (u32 LE)  header (JSON, then spaces)  CRC-32 of the header (u32 LE)  body (zlib)
//! body, once inflated:  block*  0 (varint)  count (varint)
//! block:                n (varint, 1 to 4096)  fingerprint (u32 LE) × n  member × n
//! member:               head (1 byte)  [prefix - 15 (varint)]  suffix
//! head:                 bit 0 state (0 flagged, 1 pending)
//!                       bits 1-2 packing: 0 raw, 1 UUID in lower case, 2 UUID in upper case
//!                       bit 3 0
//!                       bits 4-7 prefix: bytes shared with the member before (15: 15 or more,
//!                       the rest in a varint)
//! suffix, raw:          length (varint)  bytes
//! suffix, UUID:         16 - prefix bytes
//! ```
//!
//! Members are strictly ascending by identifier bytes (a reader refuses any other order), and
//! each is front-coded against the one before: only the bytes after the prefix they share
//! are written. Canonical UUIDs (`8-4-4-4-12` hex digits, all lower or all upper case) are
//! packed as their 16 bytes (the prefix then counts those bytes), which sort as their text
//! does; any other identifier is kept as it is. The fingerprints of a block come before its
//! members, as a column: random ones (CRC-32s) cost their 4 bytes and do not break the
//! matches zlib finds between identifiers, unknown ones (0: an export without attributes)
//! compress to nothing. So a random UUID costs about 14.8 bytes (its entropy in a sorted set
//! of a million is about 12.9), a sequential identifier well under one, and a fingerprint
//! 4 more.
//!
//! Versions 1 and 2, still read, wrote each member whole (`state  [fingerprint u32 LE]
//! length (varint)  identifier`) in any order; version 1 has no fingerprint (read as 0,
//! unknown: a delta run sends the user once more).
//!
//! The header is small and uncompressed (with its own checksum), so the owner can be checked
//! without inflating the body; trailing spaces let a file's header be rewritten in place
//! once the count is known. The body is one zlib stream (its Adler-32 catches corruption),
//! written and read one member at a time, into and out of any `Write` and `Read`: a million
//! members never need to be held as strings. The end marker and the count catch a truncated
//! body.

use std::io::{self, Read, Write};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

use super::header::{Header, MemberState};

/// First bytes of every stored audience.
pub const MAGIC: &[u8; 4] = b"BZXA";
/// The version this build writes.
pub const VERSION: u8 = 3;
/// The oldest version this build reads.
pub const OLDEST_VERSION: u8 = 1;
/// Longest identifier a body may hold: Braze's 987 bytes, with room to spare. Longer
/// lengths mean corruption, and are refused before anything is allocated.
pub const MAX_ID_BYTES: usize = 4096;
/// Longest header.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Spaces after a header whose count is not known yet: room for any count.
pub const HEADER_ROOM: usize = 20;
const END: u8 = 0xFF;
/// Head bits.
const PENDING_BIT: u8 = 1;
const RESERVED_BIT: u8 = 1 << 3;
/// Members of a block at most.
const BLOCK: usize = 4096;
const RAW: u8 = 0;
const UUID_LOWER: u8 = 1;
const UUID_UPPER: u8 = 2;
/// Prefix lengths held in the head itself.
const PREFIX_IN_HEAD: usize = 15;
/// Compression level of a body: the identifiers left after front coding are mostly
/// incompressible (random) or tiny (sequential); level 6 is measured to save a few
/// percent on sequential ones over level 1, and 9 nothing more (see NOTES-codec.md).
pub const LEVEL: u32 = 6;

/// Bytes staged before they are compressed: the compressor is fed in large slices (one
/// call per member would cost more than the compression itself).
const STAGE_BYTES: usize = 64 * 1024;

/// Writes members, strictly ascending by identifier bytes, as a version 3 body into `W`.
pub struct Encoder<W: Write> {
    zlib: ZlibEncoder<W>,
    /// The block being made: its fingerprints, its members, how many.
    fingerprints: Vec<u8>,
    staged: Vec<u8>,
    block: usize,
    /// The identifier before, and its packed form (what the next prefix is shared with).
    prev_id: Vec<u8>,
    prev_packed: Vec<u8>,
    count: u64,
}

impl<W: Write> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Encoder<W> {
    /// A body written into `out`, compressed at `level` (0 to 9).
    pub fn new(out: W, level: u32) -> Self {
        Self {
            zlib: ZlibEncoder::new(out, Compression::new(level.min(9))),
            fingerprints: Vec::with_capacity(BLOCK * 4),
            staged: Vec::with_capacity(STAGE_BYTES + MAX_ID_BYTES + 32),
            block: 0,
            prev_id: Vec::with_capacity(64),
            prev_packed: Vec::with_capacity(64),
            count: 0,
        }
    }

    /// Appends one member with the fingerprint of what was sent for it (0: unknown). An
    /// identifier empty, longer than [`MAX_ID_BYTES`], or not after the one before is
    /// refused (`InvalidInput`, naming no user).
    pub fn push(&mut self, id: &str, state: MemberState, fingerprint: u32) -> io::Result<()> {
        let id = id.as_bytes();
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(invalid("an identifier is empty or longer than 4096 bytes"));
        }
        if self.count > 0 && id <= &self.prev_id[..] {
            return Err(invalid("the members are not in ascending order"));
        }
        let mut uuid = [0u8; 16];
        let (kind, packed): (u8, &[u8]) = match pack_uuid(id, &mut uuid) {
            Some(upper) => (if upper { UUID_UPPER } else { UUID_LOWER }, &uuid),
            None => (RAW, id),
        };
        let prefix = shared_prefix(&self.prev_packed, packed);
        let mut head = (state as u8 & PENDING_BIT) | kind << 1;
        head |= (prefix.min(PREFIX_IN_HEAD) as u8) << 4;
        self.staged.push(head);
        if prefix >= PREFIX_IN_HEAD {
            put_varint(&mut self.staged, (prefix - PREFIX_IN_HEAD) as u64);
        }
        let suffix = &packed[prefix..];
        if kind == RAW {
            put_varint(&mut self.staged, suffix.len() as u64);
        }
        self.staged.extend_from_slice(suffix);
        self.fingerprints
            .extend_from_slice(&fingerprint.to_le_bytes());
        self.block += 1;
        self.prev_packed.clear();
        self.prev_packed.extend_from_slice(packed);
        self.prev_id.clear();
        self.prev_id.extend_from_slice(id);
        self.count += 1;
        if self.block == BLOCK || self.staged.len() >= STAGE_BYTES {
            self.write_block()?;
        }
        Ok(())
    }

    /// Compresses the block made so far, if any.
    fn write_block(&mut self) -> io::Result<()> {
        if self.block == 0 {
            return Ok(());
        }
        let mut n = Vec::with_capacity(2);
        put_varint(&mut n, self.block as u64);
        self.zlib.write_all(&n)?;
        self.zlib.write_all(&self.fingerprints)?;
        self.zlib.write_all(&self.staged)?;
        self.fingerprints.clear();
        self.staged.clear();
        self.block = 0;
        Ok(())
    }

    /// Members written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Ends the body (the end marker, the count, the zlib trailer): the output and the count.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.write_block()?;
        self.staged.push(0);
        put_varint(&mut self.staged, self.count);
        self.zlib.write_all(&self.staged)?;
        Ok((self.zlib.finish()?, self.count))
    }
}

/// The bytes an identifier takes packed (16 for a canonical UUID), before front coding.
pub fn packed_len(id: &str) -> usize {
    let mut uuid = [0u8; 16];
    match pack_uuid(id.as_bytes(), &mut uuid) {
        Some(_) => 16,
        None => id.len(),
    }
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

fn shared_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Packs a canonical UUID (36 characters, `8-4-4-4-12` hex digits, not mixing lower and
/// upper case) into 16 bytes; says whether it was in upper case. `None`: not one.
fn pack_uuid(id: &[u8], out: &mut [u8; 16]) -> Option<bool> {
    if id.len() != 36 || [8, 13, 18, 23].iter().any(|&i| id[i] != b'-') {
        return None;
    }
    let (mut lower, mut upper) = (false, false);
    let mut nibbles = id.iter().filter(|&&b| b != b'-');
    for byte in out.iter_mut() {
        let mut value = 0u8;
        for _ in 0..2 {
            let c = *nibbles.next()?;
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => {
                    lower = true;
                    c - b'a' + 10
                }
                b'A'..=b'F' => {
                    upper = true;
                    c - b'A' + 10
                }
                _ => return None,
            };
            value = value << 4 | v;
        }
        *byte = value;
    }
    // 36 characters, four of them dashes at their places: exactly 32 digits were read.
    (!(lower && upper)).then_some(upper)
}

/// The text of a packed UUID.
fn unpack_uuid(packed: &[u8], upper: bool, out: &mut Vec<u8>) {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    out.clear();
    for (i, b) in packed.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(digits[usize::from(b >> 4)]);
        out.push(digits[usize::from(b & 0xF)]);
    }
}

/// The bytes before the body: magic, version, header length and header.
pub fn header_bytes(header: &Header) -> Vec<u8> {
    header_bytes_with_room(header, 0)
}

/// The bytes before the body, the header followed by `room` spaces (in its length and its
/// checksum): a header rewritten in its place later may grow by that much.
pub fn header_bytes_with_room(header: &Header, room: usize) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).unwrap_or_default();
    json.resize(json.len() + room, b' ');
    framed_header(&json, VERSION)
}

/// The header again, padded with spaces to `len` bytes of JSON (the length of the first),
/// `None` when it no longer fits.
pub fn header_bytes_in(header: &Header, len: usize) -> Option<Vec<u8>> {
    let mut json = serde_json::to_vec(header).ok()?;
    if json.len() > len {
        return None;
    }
    json.resize(len, b' ');
    Some(framed_header(&json, VERSION))
}

fn framed_header(json: &[u8], version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 13);
    out.extend_from_slice(MAGIC);
    out.push(version);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
    out
}

/// Reads the magic, version and header from the start of a stored audience: the header, the
/// body's version, and the header's JSON length.
pub fn read_header_len(r: &mut impl Read) -> Result<(Header, u8, usize), AudienceError> {
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
    Ok((header, version, len))
}

/// Reads the magic, version and header from the start of a stored audience: the header and
/// the body's version.
pub fn read_header(r: &mut impl Read) -> Result<(Header, u8), AudienceError> {
    read_header_len(r).map(|(h, v, _)| (h, v))
}

/// The fingerprint of what is sent for a user: the CRC-32 of the object's bytes (identifier
/// type and value, attributes and their values, the flag), never 0 (0 means unknown).
pub fn fingerprint(object_bytes: &[u8]) -> u32 {
    crc32fast::hash(object_bytes).max(1)
}

/// Reads the members of a body one at a time, checking their order (version 3), the end
/// marker and the count.
pub struct BodyReader<R: Read> {
    zlib: io::BufReader<ZlibDecoder<R>>,
    version: u8,
    id: Vec<u8>,
    /// Version 3: the identifier before (for the order), and the packed form the next
    /// prefix is shared with.
    prev_id: Vec<u8>,
    packed: Vec<u8>,
    /// Version 3: the fingerprints of the block, the next one's offset, members left in it.
    fingerprints: Vec<u8>,
    next_fingerprint: usize,
    left: usize,
    read: u64,
    done: bool,
}

impl<R: Read> BodyReader<R> {
    /// Reads a body of `version` that `r` yields (positioned just after the header).
    pub fn new(r: R, version: u8) -> Self {
        Self {
            zlib: io::BufReader::with_capacity(64 * 1024, ZlibDecoder::new(r)),
            version,
            id: Vec::with_capacity(64),
            prev_id: Vec::with_capacity(64),
            packed: Vec::with_capacity(64),
            fingerprints: Vec::new(),
            next_fingerprint: 0,
            left: 0,
            read: 0,
            done: false,
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
        let read = if self.version >= 3 {
            if self.left == 0 && !self.block()? {
                return Ok(None);
            }
            let head = self.byte()?;
            let state = self.member_v3(head)?;
            let at = self.next_fingerprint;
            let mut fp = [0u8; 4];
            fp.copy_from_slice(&self.fingerprints[at..at + 4]);
            self.next_fingerprint += 4;
            self.left -= 1;
            (state, u32::from_le_bytes(fp))
        } else {
            let head = self.byte()?;
            if head == END {
                self.end()?;
                return Ok(None);
            }
            self.member_v2(head)?
        };
        std::str::from_utf8(&self.id).map_err(|_| corrupt("an identifier is not UTF-8"))?;
        self.read += 1;
        Ok(Some(read))
    }

    /// Version 3: reads the next block's size and fingerprints; false at the end of the
    /// body (which is then checked).
    fn block(&mut self) -> Result<bool, AudienceError> {
        let n = self.varint()?;
        if n == 0 {
            self.end()?;
            return Ok(false);
        }
        if n > BLOCK as u64 {
            return Err(corrupt("a block size is out of range"));
        }
        self.fingerprints.resize(n as usize * 4, 0);
        self.zlib
            .read_exact(&mut self.fingerprints)
            .map_err(|e| cut_or_damaged(&e))?;
        self.left = n as usize;
        self.next_fingerprint = 0;
        Ok(true)
    }

    /// After the end marker: the count, then nothing.
    fn end(&mut self) -> Result<(), AudienceError> {
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
        Ok(())
    }

    /// A member of version 1 or 2, after its state byte.
    fn member_v2(&mut self, state: u8) -> Result<(MemberState, u32), AudienceError> {
        let state = match state {
            0 => MemberState::Flagged,
            1 => MemberState::Pending,
            other => return Err(corrupt(&format!("unknown member state {other}"))),
        };
        let mut fingerprint = [0u8; 4];
        if self.version >= 2 {
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
        Ok((state, u32::from_le_bytes(fingerprint)))
    }

    /// A member of version 3, after its head.
    fn member_v3(&mut self, head: u8) -> Result<MemberState, AudienceError> {
        if head & RESERVED_BIT != 0 {
            return Err(corrupt("a member's head is not valid"));
        }
        let state = if head & PENDING_BIT == 0 {
            MemberState::Flagged
        } else {
            MemberState::Pending
        };
        let kind = (head >> 1) & 3;
        let mut prefix = usize::from(head >> 4);
        if prefix == PREFIX_IN_HEAD {
            let more = self.varint()?;
            if more > MAX_ID_BYTES as u64 {
                return Err(corrupt("a shared prefix is out of range"));
            }
            prefix += more as usize;
        }
        if prefix > self.packed.len() {
            return Err(corrupt(
                "a shared prefix is longer than the identifier before it",
            ));
        }
        self.packed.truncate(prefix);
        std::mem::swap(&mut self.id, &mut self.prev_id);
        match kind {
            RAW => {
                let len = self.varint()?;
                let total = (prefix as u64).saturating_add(len);
                if total == 0 || total > MAX_ID_BYTES as u64 {
                    return Err(corrupt("an identifier length is out of range"));
                }
                self.read_suffix(total as usize)?;
                self.id.clear();
                self.id.extend_from_slice(&self.packed);
            }
            UUID_LOWER | UUID_UPPER => {
                if prefix > 16 {
                    return Err(corrupt("a shared prefix is out of range"));
                }
                self.read_suffix(16)?;
                unpack_uuid(&self.packed, kind == UUID_UPPER, &mut self.id);
            }
            other => return Err(corrupt(&format!("unknown identifier packing {other}"))),
        }
        if self.read > 0 && self.id <= self.prev_id {
            return Err(corrupt("the members are not in order"));
        }
        Ok(state)
    }

    /// Reads the packed identifier's bytes after its prefix, up to `total`.
    fn read_suffix(&mut self, total: usize) -> Result<(), AudienceError> {
        let start = self.packed.len();
        self.packed.resize(total, 0);
        self.zlib
            .read_exact(&mut self.packed[start..])
            .map_err(|e| cut_or_damaged(&e))
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

/// LEB128: appends `n` to `out`.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
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
    /// It could not be sorted through the scratch directory ([`crate::spill`]: a full disk,
    /// an unwritable directory).
    #[error("{0}")]
    Scratch(String),
}

impl From<crate::spill::SpillError> for AudienceError {
    fn from(e: crate::spill::SpillError) -> Self {
        Self::Scratch(e.to_string())
    }
}

/// The writer of version 2, kept to make the bodies older builds wrote (tests read them).
#[cfg(test)]
pub(crate) mod v2 {
    use super::*;

    /// Members in any order, each whole, into a version-2 audience of `header`.
    pub(crate) fn audience_bytes(header: &Header, members: &[(&str, MemberState, u32)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (id, state, fingerprint) in members {
            body.push(*state as u8);
            body.extend_from_slice(&fingerprint.to_le_bytes());
            put_varint(&mut body, id.len() as u64);
            body.extend_from_slice(id.as_bytes());
        }
        body.push(END);
        put_varint(&mut body, members.len() as u64);
        let mut z = ZlibEncoder::new(Vec::new(), Compression::new(6));
        let _ = z.write_all(&body);
        let json = serde_json::to_vec(header).unwrap_or_default();
        let mut out = framed_header(&json, 2);
        out.extend_from_slice(&z.finish().unwrap_or_default());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(members: &[(&str, MemberState, u32)]) -> Vec<u8> {
        let mut w = Encoder::new(Vec::new(), LEVEL);
        for (id, state, fp) in members {
            w.push(id, *state, *fp).unwrap();
        }
        w.finish().unwrap().0
    }

    fn read_all(
        body: &[u8],
        version: u8,
    ) -> Result<Vec<(String, MemberState, u32)>, AudienceError> {
        let mut r = BodyReader::new(body, version);
        let mut got = Vec::new();
        while let Some((id, state, fp)) = r.next_member()? {
            got.push((id.to_owned(), state, fp));
        }
        Ok(got)
    }

    #[test]
    fn varints_round_trip() {
        for n in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, n);
            assert!(buf.len() <= 10);
            let mut z = ZlibEncoder::new(Vec::new(), Compression::new(1));
            z.write_all(&buf).unwrap();
            let z = z.finish().unwrap();
            let mut r = BodyReader::new(&z[..], VERSION);
            assert_eq!(r.varint().unwrap(), n);
        }
    }

    #[test]
    fn members_round_trip_with_their_state_packing_and_fingerprint() {
        let lower = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        let lower2 = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4e";
        let upper = "0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D";
        let mixed = "0A1B2C3D-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        let long = "x".repeat(987);
        let members = [
            (upper, MemberState::Pending, 0),
            (mixed, MemberState::Flagged, 3),
            (lower, MemberState::Flagged, 7),
            (lower2, MemberState::Pending, u32::MAX),
            ("u1", MemberState::Flagged, 0),
            (long.as_str(), MemberState::Flagged, 1),
            ("xy", MemberState::Flagged, 0),
            ("é-2", MemberState::Pending, 9),
        ];
        let got = read_all(&body(&members), VERSION).unwrap();
        let want: Vec<_> = members
            .iter()
            .map(|(id, s, fp)| ((*id).to_owned(), *s, *fp))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn uuids_pack_only_when_canonical() {
        let mut out = [0u8; 16];
        assert_eq!(
            pack_uuid(b"00000000-0000-0000-0000-000000000000", &mut out),
            Some(false)
        );
        assert_eq!(
            pack_uuid(b"ABCDEF00-0000-0000-0000-000000000000", &mut out),
            Some(true)
        );
        let mut text = Vec::new();
        unpack_uuid(&out, true, &mut text);
        assert_eq!(text, b"ABCDEF00-0000-0000-0000-000000000000");
        for not in [
            &b"abcdef00-0000-0000-0000-00000000000"[..],
            b"abcdef00-0000-0000-0000-0000000000000",
            b"abcdef00+0000-0000-0000-000000000000",
            b"abcdeg00-0000-0000-0000-000000000000",
            b"aBcdef00-0000-0000-0000-000000000000",
            b"{bcdef0-0000-0000-0000-0000000000000}",
        ] {
            assert_eq!(
                pack_uuid(not, &mut out),
                None,
                "{}",
                String::from_utf8_lossy(not)
            );
        }
    }

    #[test]
    fn the_writer_refuses_members_out_of_order_repeated_or_empty() {
        let mut w = Encoder::new(Vec::new(), 1);
        w.push("b", MemberState::Flagged, 0).unwrap();
        for bad in ["a", "b", ""] {
            let e = w.push(bad, MemberState::Flagged, 0).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        assert!(
            w.push(&"c".repeat(MAX_ID_BYTES + 1), MemberState::Flagged, 0)
                .is_err()
        );
        assert_eq!(w.count(), 1);
    }

    #[test]
    fn every_cut_and_many_flips_of_a_body_are_errors_never_panics() {
        let members: Vec<(String, MemberState, u32)> = (0..40)
            .map(|i| {
                let id = if i % 3 == 0 {
                    format!("{i:08x}-0000-4000-8000-{:012x}", i * 7919)
                } else {
                    format!("user-{i:04}")
                };
                (id, MemberState::Flagged, i % 4)
            })
            .collect();
        let mut sorted = members.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let refs: Vec<_> = sorted
            .iter()
            .map(|(i, s, f)| (i.as_str(), *s, *f))
            .collect();
        let b = body(&refs);
        assert_eq!(read_all(&b, VERSION).unwrap().len(), 40);
        for cut in 0..b.len() {
            assert!(read_all(&b[..cut], VERSION).is_err(), "cut at {cut}");
        }
        // The inflated body, damaged, then compressed again (past zlib's checksum, which
        // catches damage to the stored bytes): never a panic, never a member lost without an
        // error. A byte of an identifier changed into another valid one cannot be told.
        let mut plain = Vec::new();
        ZlibDecoder::new(&b[..]).read_to_end(&mut plain).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        let mut caught = 0;
        for round in 0..3000 {
            let mut p = plain.clone();
            if round % 2 == 0 {
                let i = rng.usize(..p.len());
                p[i] ^= 1 << rng.u8(..8);
            } else {
                let i = rng.usize(..p.len());
                p[i] = rng.u8(..);
            }
            let mut z = ZlibEncoder::new(Vec::new(), Compression::new(1));
            z.write_all(&p).unwrap();
            match read_all(&z.finish().unwrap(), VERSION) {
                Err(e) => {
                    caught += 1;
                    assert!(!e.to_string().contains("user-"), "{e}");
                }
                Ok(got) => assert_eq!(got.len(), 40, "a damaged body never loses members silently"),
            }
        }
        assert!(caught > 600, "{caught} of 3000 damages were caught");
    }

    #[test]
    fn a_body_of_version_2_is_still_read() {
        let header = Header {
            export: super::super::Owner {
                namespace: None,
                name: "e".into(),
            },
            identifier: crate::spec::IdentifierKind::ExternalId,
            alias_label: None,
            attribute: "a".into(),
            export_name: "F".into(),
            last_full_resync: None,
            members: 3,
            workspace: None,
            stray_flags: Vec::new(),
        };
        let members = [
            ("zz", MemberState::Flagged, 5),
            (
                "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                MemberState::Pending,
                0,
            ),
            ("aa", MemberState::Flagged, u32::MAX),
        ];
        let bytes = v2::audience_bytes(&header, &members);
        let mut r = &bytes[..];
        let (h, version) = read_header(&mut r).unwrap();
        assert_eq!((h, version), (header, 2));
        let got = read_all(r, 2).unwrap();
        let want: Vec<_> = members
            .iter()
            .map(|(id, s, fp)| ((*id).to_owned(), *s, *fp))
            .collect();
        assert_eq!(got, want, "in the order written, fingerprints and all");
    }

    #[test]
    fn a_header_rewritten_in_its_room_reads_the_same() {
        let mut h = Header {
            export: super::super::Owner {
                namespace: Some("n".into()),
                name: "e".into(),
            },
            identifier: crate::spec::IdentifierKind::ExternalId,
            alias_label: None,
            attribute: "a".into(),
            export_name: "F".into(),
            last_full_resync: None,
            members: 0,
            workspace: None,
            stray_flags: Vec::new(),
        };
        let first = header_bytes_with_room(&h, HEADER_ROOM);
        let (_, _, len) = read_header_len(&mut &first[..]).unwrap();
        h.members = u64::MAX;
        let again = header_bytes_in(&h, len).unwrap();
        assert_eq!(again.len(), first.len());
        assert_eq!(read_header(&mut &again[..]).unwrap().0, h);
    }
}
