//! An audience in its encoded form: the header, then the compressed body, split into parts
//! small enough for a Secret; read back part after part without joining them. An audience
//! loaded with the records of runs that stopped before they saved ([`Encoded::with_pending`])
//! reads their users after its own, as pending.

use std::fmt;
use std::io::{self, Read};

use super::codec::{self, AudienceError, BodyReader, BodyWriter};
use super::header::{Audience, Header, Member, MemberState};

/// Largest part of an encoded audience. A Secret holds at most 1 MiB, and its data is
/// base64 in the API: 720 KiB of bytes is 960 KiB of base64, leaving room for metadata.
pub const MAX_PART_BYTES: usize = 720 * 1024;

/// An encoded audience: the header, then the compressed body, in parts of at most
/// [`MAX_PART_BYTES`] (their concatenation is the file form).
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Boxed: an `Encoded` is moved around whole, its header is large.
    header: Box<Header>,
    version: u8,
    parts: Vec<Vec<u8>>,
    /// Pending records of runs that stopped before they saved, read after the body.
    pending: Vec<Encoded>,
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("header", &self.header)
            .field("bytes", &self.len_bytes())
            .field("parts", &self.parts.len())
            .field("pending", &self.pending.len())
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
            header: Box::new(header),
            version: codec::VERSION,
            parts: split(bytes),
            pending: Vec::new(),
        }
    }

    /// Reads the header of stored parts (in order); the body is checked when it is read
    /// ([`Encoded::verify`], [`Encoded::members`]).
    pub fn from_parts(parts: Vec<Vec<u8>>) -> Result<Self, AudienceError> {
        let (header, version) = codec::read_header(&mut Chain::new(&parts))?;
        Ok(Self {
            header: Box::new(header),
            version,
            parts,
            pending: Vec::new(),
        })
    }

    /// This audience (or, when there is none, an empty one about the first record) with the
    /// pending records of runs that stopped before they saved: their users are read after
    /// its own, as pending, so that a run removes those who left. A record of another export
    /// or identifier type is refused; one written under another flag (by a run that changed
    /// `attribute` or `exportName`) adds that flag to [`Header::stray_flags`].
    pub fn with_pending(
        main: Option<Encoded>,
        pending: Vec<Encoded>,
    ) -> Result<Option<Encoded>, String> {
        let mut pending = pending.into_iter();
        let mut main = match main {
            Some(m) => m,
            None => {
                let Some(first) = pending.next() else {
                    return Ok(None);
                };
                let header = Header {
                    last_full_resync: None,
                    ..(*first.header).clone()
                };
                let mut empty = Self::new(header, BodyWriter::new(1));
                empty.attach(first)?;
                empty
            }
        };
        for record in pending {
            main.attach(record)?;
        }
        Ok(Some(main))
    }

    fn attach(&mut self, record: Encoded) -> Result<(), String> {
        let (h, r) = (&mut self.header, record.header());
        let owner = (r.export.namespace.as_ref(), &r.export.name);
        if owner != (h.export.namespace.as_ref(), &h.export.name)
            || r.identifier != h.identifier
            || r.alias_label != h.alias_label
        {
            return Err(format!(
                "a pending record of {} does not match the audience of {}",
                r.export, h.export
            ));
        }
        let flag = r.flag();
        if flag != h.flag() && !h.stray_flags.contains(&flag) {
            h.stray_flags.push(flag);
            h.stray_flags.sort();
        }
        self.pending.push(record);
        Ok(())
    }

    /// The pending records attached (see [`Encoded::with_pending`]).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Members of the pending records attached (some may also be members of the body).
    pub fn pending_members(&self) -> u64 {
        self.pending.iter().map(|p| p.header.members).sum()
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

    /// Streams the members, one at a time: the body's, then the pending records' (as
    /// pending, fingerprint unknown). A user may come more than once.
    pub fn members(&self) -> Result<Members<'_>, AudienceError> {
        Ok(Members {
            body: self.body()?,
            pending: self.pending.iter(),
            in_pending: false,
        })
    }

    fn body(&self) -> Result<BodyReader<Chain<'_>>, AudienceError> {
        let mut chain = Chain::new(&self.parts);
        codec::read_header(&mut chain)?;
        Ok(BodyReader::new(chain, self.version))
    }

    /// Reads the whole body once (and every pending record's): every member, the count and
    /// the checksum.
    pub fn verify(&self) -> Result<(), AudienceError> {
        let mut r = self.body()?;
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
        self.pending.iter().try_for_each(Encoded::verify)
    }
}

/// The members of an audience and of its pending records, in turn (see [`Encoded::members`]).
pub struct Members<'a> {
    body: BodyReader<Chain<'a>>,
    pending: std::slice::Iter<'a, Encoded>,
    in_pending: bool,
}

impl Members<'_> {
    /// The next member (identifier, state, fingerprint), `None` after the last one.
    pub fn next_member(&mut self) -> Result<Option<(&str, MemberState, u32)>, AudienceError> {
        loop {
            if let Some((state, fp)) = self.body.advance()? {
                let read = if self.in_pending {
                    (MemberState::Pending, 0)
                } else {
                    (state, fp)
                };
                return Ok(Some((self.body.id(), read.0, read.1)));
            }
            let Some(next) = self.pending.next() else {
                return Ok(None);
            };
            self.body = next.body()?;
            self.in_pending = true;
        }
    }
}

/// Encodes an audience into parts of at most [`MAX_PART_BYTES`] each.
pub fn encode(audience: &Audience) -> Vec<Vec<u8>> {
    let mut body = BodyWriter::new(6);
    for m in &audience.members {
        body.push(&m.id, m.state, m.fingerprint);
    }
    Encoded::new(audience.header.clone(), body).into_parts()
}

/// Decodes parts (in order) into an audience held in memory.
pub fn decode(parts: Vec<Vec<u8>>) -> Result<Audience, AudienceError> {
    let encoded = Encoded::from_parts(parts)?;
    let mut members = Vec::new();
    let mut r = encoded.members()?;
    while let Some((id, state, fingerprint)) = r.next_member()? {
        members.push(Member {
            id: id.to_owned(),
            state,
            fingerprint,
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
    Ok(Audience {
        header: *header,
        members,
    })
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
