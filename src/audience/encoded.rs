//! An audience in its encoded form: the header, then the compressed body, split into parts
//! small enough for a Secret; read back part after part without joining them.

use std::fmt;
use std::io::{self, Read};

use super::codec::{self, AudienceError, BodyReader, BodyWriter};
use super::header::{Audience, Header, Member};

/// Largest part of an encoded audience. A Secret holds at most 1 MiB, and its data is
/// base64 in the API: 720 KiB of bytes is 960 KiB of base64, leaving room for metadata.
pub const MAX_PART_BYTES: usize = 720 * 1024;

/// An encoded audience: the header, then the compressed body, in parts of at most
/// [`MAX_PART_BYTES`] (their concatenation is the file form).
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded {
    header: Header,
    parts: Vec<Vec<u8>>,
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("header", &self.header)
            .field("bytes", &self.len_bytes())
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl Encoded {
    /// Builds the encoded form from a header and a finished body.
    pub fn new(mut header: Header, body: BodyWriter) -> Self {
        let (body, count) = body.finish();
        header.members = count;
        let mut bytes = codec::header_bytes(&header);
        bytes.extend_from_slice(&body);
        drop(body);
        Self {
            header,
            parts: split(bytes),
        }
    }

    /// Reads the header of stored parts (in order); the body is checked when it is read
    /// ([`Encoded::verify`], [`Encoded::members`]).
    pub fn from_parts(parts: Vec<Vec<u8>>) -> Result<Self, AudienceError> {
        let header = codec::read_header(&mut Chain::new(&parts))?;
        Ok(Self { header, parts })
    }

    /// Reads the file form.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, AudienceError> {
        Self::from_parts(split(bytes))
    }

    /// What the audience is about.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The parts, each at most [`MAX_PART_BYTES`].
    pub fn parts(&self) -> &[Vec<u8>] {
        &self.parts
    }

    /// Takes the parts.
    pub fn into_parts(self) -> Vec<Vec<u8>> {
        self.parts
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    /// Streams the members, one at a time.
    pub fn members(&self) -> Result<BodyReader<Chain<'_>>, AudienceError> {
        let mut chain = Chain::new(&self.parts);
        codec::read_header(&mut chain)?;
        Ok(BodyReader::new(chain))
    }

    /// Reads the whole body once: every member, the count and the checksum.
    pub fn verify(&self) -> Result<(), AudienceError> {
        let mut r = self.members()?;
        let mut n = 0u64;
        while r.next_member()?.is_some() {
            n += 1;
        }
        if n != self.header.members {
            return Err(AudienceError::Corrupt(format!(
                "the header says {} members and the body holds {n}",
                self.header.members
            )));
        }
        Ok(())
    }
}

/// Encodes an audience into parts of at most [`MAX_PART_BYTES`] each.
pub fn encode(audience: &Audience) -> Vec<Vec<u8>> {
    let mut body = BodyWriter::new(6);
    for m in &audience.members {
        body.push(&m.id, m.state);
    }
    Encoded::new(audience.header.clone(), body).into_parts()
}

/// Decodes parts (in order) into an audience held in memory.
pub fn decode(parts: Vec<Vec<u8>>) -> Result<Audience, AudienceError> {
    let encoded = Encoded::from_parts(parts)?;
    let mut members = Vec::new();
    let mut r = encoded.members()?;
    while let Some((id, state)) = r.next_member()? {
        members.push(Member {
            id: id.to_owned(),
            state,
        });
    }
    drop(r);
    let Encoded { header, .. } = encoded;
    if members.len() as u64 != header.members {
        return Err(AudienceError::Corrupt(format!(
            "the header says {} members and the body holds {}",
            header.members,
            members.len()
        )));
    }
    Ok(Audience { header, members })
}

fn split(bytes: Vec<u8>) -> Vec<Vec<u8>> {
    if bytes.len() <= MAX_PART_BYTES {
        return vec![bytes];
    }
    bytes.chunks(MAX_PART_BYTES).map(<[u8]>::to_vec).collect()
}

/// Reads parts one after the other.
#[derive(Debug)]
pub struct Chain<'a> {
    parts: &'a [Vec<u8>],
    index: usize,
    offset: usize,
}

impl<'a> Chain<'a> {
    fn new(parts: &'a [Vec<u8>]) -> Self {
        Self {
            parts,
            index: 0,
            offset: 0,
        }
    }
}

impl Read for Chain<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(part) = self.parts.get(self.index) {
            if self.offset < part.len() {
                let n = buf.len().min(part.len() - self.offset);
                buf[..n].copy_from_slice(&part[self.offset..self.offset + n]);
                self.offset += n;
                return Ok(n);
            }
            self.index += 1;
            self.offset = 0;
        }
        Ok(0)
    }
}
