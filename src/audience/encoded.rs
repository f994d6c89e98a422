//! An audience in its encoded form: the header, then the compressed body; in memory as
//! parts small enough for a Secret (read back part after part without joining them), or in
//! a file (`run --state`), read lazily, as often as asked, never held whole. An audience
//! loaded with the records of runs that stopped before they saved
//! ([`Encoded::with_pending`]) reads their users after its own, as pending.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::codec::{self, AudienceError, BodyReader};
use super::header::{Audience, Header, Member, MemberState};
use super::writer::BodyWriter;

/// Largest part of an encoded audience. A Secret holds at most 1 MiB, and its data is
/// base64 in the API: 720 KiB of bytes is 960 KiB of base64, leaving room for metadata.
pub const MAX_PART_BYTES: usize = 720 * 1024;

/// An encoded audience: the header, then the compressed body, in parts of at most
/// [`MAX_PART_BYTES`] (their concatenation is the file form), or in a file.
#[derive(Clone)]
pub struct Encoded {
    /// Boxed: an `Encoded` is moved around whole, its header is large.
    header: Box<Header>,
    version: u8,
    bytes: Bytes,
    /// Pending records of runs that stopped before they saved, read after the body.
    pending: Vec<Encoded>,
}

/// Where the encoded bytes are.
#[derive(Clone)]
enum Bytes {
    Parts(Vec<Vec<u8>>),
    File(Arc<FileBytes>),
}

/// An encoded audience in a file: read by offset (so that readers never share a position,
/// and a file renamed over its path meanwhile changes nothing), removed when dropped if it
/// is a temporary never saved.
struct FileBytes {
    file: File,
    path: PathBuf,
    len: u64,
    /// Made by this process beside a state file: removed unless [`FileBytes::kept`].
    temporary: bool,
    kept: AtomicBool,
    /// The parts, read on demand for [`Encoded::parts`].
    parts: OnceLock<Vec<Vec<u8>>>,
}

impl Drop for FileBytes {
    fn drop(&mut self) {
        if self.temporary && !self.kept.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a new audience is built: in memory (parts, for Secrets), or in a new private file
/// beside a state file (`run --state FILE`), which [`crate::audience::write_file`] then
/// renames over it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Parts in memory.
    #[default]
    Memory,
    /// A temporary beside this path.
    Beside(PathBuf),
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("header", &self.header)
            .field("bytes", &self.len_bytes())
            .field(
                "parts",
                &match &self.bytes {
                    Bytes::Parts(p) => p.len(),
                    Bytes::File(_) => 0,
                },
            )
            .field("in_file", &matches!(self.bytes, Bytes::File(_)))
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl PartialEq for Encoded {
    /// Same header, version, bytes and pending records (the bytes compared as streams).
    fn eq(&self, other: &Self) -> bool {
        self.header == other.header
            && self.version == other.version
            && self.len_bytes() == other.len_bytes()
            && self.pending == other.pending
            && same_stream(self.reader(), other.reader())
    }
}

impl Eq for Encoded {}

fn same_stream(mut a: impl Read, mut b: impl Read) -> bool {
    let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = fill(&mut a, &mut x);
        let m = fill(&mut b, &mut y);
        match (n, m) {
            (Ok(n), Ok(m)) if n == m && x[..n] == y[..m] => {
                if n == 0 {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

/// Reads until `buf` is full or the end.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Encoded {
    /// Builds the encoded form, in memory, from a header and a writer that held its members
    /// in memory ([`BodyWriter::new`]: it cannot fail but for an identifier it could not
    /// store, and then the audience is empty and the failure logged). The pipeline uses
    /// [`Encoded::build`], which says why it failed.
    pub fn new(header: Header, body: BodyWriter) -> Self {
        let empty = Header {
            members: 0,
            ..header.clone()
        };
        Self::build(header, body, &Output::Memory).unwrap_or_else(|e| {
            tracing::error!(error = %e, "an audience could not be encoded");
            let mut bytes = codec::header_bytes(&empty);
            let (body, _) = codec::Encoder::new(Vec::new(), 1)
                .finish()
                .unwrap_or_default();
            bytes.extend_from_slice(&body);
            Self {
                header: Box::new(empty),
                version: codec::VERSION,
                bytes: Bytes::Parts(split(bytes)),
                pending: Vec::new(),
            }
        })
    }

    /// Builds the encoded form of `header` and the members of `body`, where `output` says.
    pub fn build(header: Header, body: BodyWriter, output: &Output) -> Result<Self, AudienceError> {
        Self::build_with(header, body, output, |_, state, _, _| Some(state))
    }

    /// Builds the encoded form of `header` and the members of `body` as `keep` says (see
    /// [`BodyWriter::finish_into`]), where `output` says; `header.members` is set to the
    /// members written.
    pub fn build_with(
        mut header: Header,
        body: BodyWriter,
        output: &Output,
        keep: impl FnMut(&str, MemberState, u32, u8) -> Option<MemberState>,
    ) -> Result<Self, AudienceError> {
        header.members = 0;
        let first = codec::header_bytes_with_room(&header, codec::HEADER_ROOM);
        let json_len = first.len() - 13;
        let rewrite = |header: &Header| {
            codec::header_bytes_in(header, json_len)
                .ok_or_else(|| AudienceError::Corrupt("the header no longer fits its room".into()))
        };
        let bytes = match output {
            Output::Memory => {
                let (mut bytes, count) = body.finish_into(first, keep)?;
                header.members = count;
                let again = rewrite(&header)?;
                bytes[..again.len()].copy_from_slice(&again);
                Bytes::Parts(split(bytes))
            }
            Output::Beside(path) => {
                let (file, tmp) = crate::private_file::create_beside(path)?;
                // From here on, the temporary goes when this is dropped, failed or not.
                let mut bytes = FileBytes {
                    file,
                    path: tmp,
                    len: 0,
                    temporary: true,
                    kept: AtomicBool::new(false),
                    parts: OnceLock::new(),
                };
                let mut w = io::BufWriter::with_capacity(256 * 1024, &bytes.file);
                w.write_all(&first)?;
                let (w, count) = body.finish_into(w, keep)?;
                let mut f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
                header.members = count;
                f.seek(SeekFrom::Start(0))?;
                f.write_all(&rewrite(&header)?)?;
                bytes.len = bytes.file.metadata()?.len();
                Bytes::File(Arc::new(bytes))
            }
        };
        Ok(Self {
            header: Box::new(header),
            version: codec::VERSION,
            bytes,
            pending: Vec::new(),
        })
    }

    /// Reads the header of stored parts (in order); the body is checked when it is read
    /// ([`Encoded::verify`], [`Encoded::members`]).
    pub fn from_parts(parts: Vec<Vec<u8>>) -> Result<Self, AudienceError> {
        let (header, version) = codec::read_header(&mut Chain::new(&parts))?;
        Ok(Self {
            header: Box::new(header),
            version,
            bytes: Bytes::Parts(parts),
            pending: Vec::new(),
        })
    }

    /// Reads the header of the audience in `file` (at `path`); the body is read from the
    /// open file when asked ([`Encoded::members`], as often as asked).
    pub fn from_file(file: File, path: &Path) -> Result<Self, AudienceError> {
        let len = file.metadata()?.len();
        let bytes = FileBytes {
            file,
            path: path.to_owned(),
            len,
            temporary: false,
            kept: AtomicBool::new(false),
            parts: OnceLock::new(),
        };
        let (header, version) = codec::read_header(&mut FileReader::new(&bytes))?;
        Ok(Self {
            header: Box::new(header),
            version,
            bytes: Bytes::File(Arc::new(bytes)),
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

    /// The parts, each at most [`MAX_PART_BYTES`]. An audience in a file is read into
    /// memory for it (once; see [`Encoded::reader`] to stream it instead); a file that can
    /// no longer be read gives no parts, and the failure is logged.
    pub fn parts(&self) -> &[Vec<u8>] {
        match &self.bytes {
            Bytes::Parts(p) => p,
            Bytes::File(f) => f.parts.get_or_init(|| {
                let mut bytes = Vec::with_capacity(f.len as usize);
                match FileReader::new(f).read_to_end(&mut bytes) {
                    Ok(_) => split(bytes),
                    Err(e) => {
                        tracing::error!(error = %e, "the stored audience's file cannot be read");
                        Vec::new()
                    }
                }
            }),
        }
    }

    /// Takes the parts (see [`Encoded::parts`]).
    pub fn into_parts(self) -> Vec<Vec<u8>> {
        match self.bytes {
            Bytes::Parts(p) => p,
            Bytes::File(_) => self.parts().to_vec(),
        }
    }

    /// Whether its members come in identifier order, each once (a body of version 3, and
    /// no pending record attached).
    pub fn is_sorted(&self) -> bool {
        self.version >= 3 && self.pending.is_empty()
    }

    /// Whether it is in a file (not held in memory).
    pub fn in_file(&self) -> bool {
        matches!(self.bytes, Bytes::File(_))
    }

    /// The whole encoded form, streamed (the concatenation of the parts, or the file).
    pub fn reader(&self) -> impl Read + '_ {
        self.source()
    }

    fn source(&self) -> Source<'_> {
        match &self.bytes {
            Bytes::Parts(p) => Source::Parts(Chain::new(p)),
            Bytes::File(f) => Source::File(FileReader::new(f)),
        }
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        match &self.bytes {
            Bytes::Parts(p) => p.iter().map(Vec::len).sum(),
            Bytes::File(f) => f.len as usize,
        }
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

    fn body(&self) -> Result<BodyReader<Source<'_>>, AudienceError> {
        let mut source = self.source();
        codec::read_header(&mut source)?;
        Ok(BodyReader::new(source, self.version))
    }

    /// Saves it at `path`: an audience built beside it ([`Output::Beside`]) is flushed to
    /// disk and renamed over it; any other is written to a new private temporary beside it
    /// first. A crash leaves the old file or the new one, never a mix.
    pub(super) fn save_as(&self, path: &Path) -> io::Result<()> {
        if let Bytes::File(f) = &self.bytes
            && f.temporary
            && f.path.parent() == Some(parent_of(path))
            && !f.kept.load(Ordering::Acquire)
        {
            f.file.sync_all()?;
            std::fs::rename(&f.path, path)?;
            f.kept.store(true, Ordering::Release);
            // The file is now the state file's: a later save copies it.
            return Ok(());
        }
        let (mut out, tmp) = crate::private_file::create_beside(path)?;
        let result = (|| {
            io::copy(&mut self.reader(), &mut out)?;
            out.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
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
    body: BodyReader<Source<'a>>,
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
    let mut body = BodyWriter::new(codec::LEVEL);
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
    let header = encoded.header;
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

/// The directory a path is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Reads an audience's bytes from its parts or its file.
enum Source<'a> {
    Parts(Chain<'a>),
    File(FileReader<'a>),
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Parts(c) => c.read(buf),
            Self::File(f) => f.read(buf),
        }
    }
}

/// Reads a file by offset, from its start to the length it had when opened.
struct FileReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl<'a> FileReader<'a> {
    fn new(bytes: &'a FileBytes) -> Self {
        Self {
            file: &bytes.file,
            pos: 0,
            end: bytes.len,
        }
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = read_at(self.file, &mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}
