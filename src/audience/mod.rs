//! The stored audience: the users an export flagged, kept between runs so that users who
//! leave the Look can lose the flag (`removal: Remove`) and users already flagged need not be
//! sent again (`delta: true`).
//!
//! It is personal data: identifiers are kept only in the compressed body, and never appear
//! in a log line, an error message, a status or an Event. The controller keeps it in Secrets
//! ([`Encoded::parts`], each under [`MAX_PART_BYTES`]); the `run` command keeps it in a file
//! (`--state`, [`read_file`] and [`write_file`]).

pub mod codec;
pub mod seen;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::schedule::RUN_NOW_ANNOTATION;
use crate::spec::{BrazeExportSpec, BrazeExportStatus, IdentifierKind, RemovalMode};
use codec::{BodyReader, BodyWriter};

/// Largest part of an encoded audience. A Secret holds at most 1 MiB, and its data is
/// base64 in the API: 720 KiB of bytes is 960 KiB of base64, leaving room for metadata.
pub const MAX_PART_BYTES: usize = 720 * 1024;

/// The annotation that allows one run-now run to remove more than `removalLimitPercent`: its
/// value must equal the `looker-braze.dev/run-now` value of that run.
pub const ALLOW_REMOVAL_ANNOTATION: &str = "looker-braze.dev/allow-removal";

/// Which export an audience belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// The export's namespace (absent for a `run` file without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The export's name.
    pub name: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What an audience is about: its owner, how its users are identified, and the flag they
/// carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// The export it belongs to.
    pub export: Owner,
    /// How its users are identified.
    pub identifier: IdentifierKind,
    /// The alias label, for `user_alias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_label: Option<String>,
    /// The array attribute the flag is in.
    pub attribute: String,
    /// The flag (the export's `exportName`).
    pub export_name: String,
    /// When a run last sent every user (a full resync); absent before the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_full_resync: Option<Timestamp>,
    /// How many members the body holds.
    #[serde(default)]
    pub members: u64,
}

impl Header {
    /// Refuses an audience that belongs to another export or identifies users another way:
    /// using it would remove flags from the wrong users. Says why, naming no user.
    pub fn check(
        &self,
        owner: &Owner,
        identifier: IdentifierKind,
        alias_label: Option<&str>,
    ) -> Result<(), String> {
        if self.export != *owner {
            return Err(format!(
                "it belongs to the export {}, not {owner}",
                self.export
            ));
        }
        if self.identifier != identifier {
            return Err(format!(
                "it holds {} identifiers, and this export uses {}",
                self.identifier.key(),
                identifier.key()
            ));
        }
        if identifier == IdentifierKind::UserAlias && self.alias_label.as_deref() != alias_label {
            return Err(format!(
                "it holds user aliases labelled {:?}, and this export uses {:?}",
                self.alias_label.as_deref().unwrap_or_default(),
                alias_label.unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// Whether a member surely holds the flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemberState {
    /// Braze acknowledged the flag.
    Flagged = 0,
    /// Unsure: the add or the remove was never acknowledged (it may or may not have been
    /// applied), or an earlier flag may remain. Sent again by a delta run; removed when the
    /// user leaves.
    Pending = 1,
}

/// One user of an audience. Its `Debug` form hides the identifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Member {
    /// The identifier (personal data).
    pub id: String,
    /// Whether the flag is surely there.
    pub state: MemberState,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Member(<{} bytes>, {:?})", self.id.len(), self.state)
    }
}

/// An audience held in memory whole (for small audiences and tests; the pipeline streams).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audience {
    /// What it is about (`members` is set when encoding).
    pub header: Header,
    /// Its users.
    pub members: Vec<Member>,
}

/// Why a stored audience cannot be used. Never names a user.
#[derive(Debug, thiserror::Error)]
pub enum AudienceError {
    /// The bytes do not start as an audience does.
    #[error("it is not a stored audience (the first bytes are not BZXA)")]
    NotAnAudience,
    /// Written by a newer build.
    #[error("it is of version {0}, and this build reads version {v}", v = codec::VERSION)]
    UnsupportedVersion(u8),
    /// Damaged or cut short.
    #[error("it is damaged: {0}")]
    Corrupt(String),
    /// It could not be read or written.
    #[error("{0}")]
    Io(#[from] io::Error),
}

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

/// Reads a state file: `None` when there is none yet (the first run creates it).
pub fn read_file(path: &Path) -> Result<Option<Encoded>, AudienceError> {
    match std::fs::read(path) {
        Ok(bytes) => Encoded::from_bytes(bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes a state file atomically: a temporary file beside it (readable by its owner only:
/// it holds personal data), flushed to disk, then renamed over it. A crash leaves the old
/// file or the new one, never a mix.
pub fn write_file(path: &Path, encoded: &Encoded) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        for part in encoded.parts() {
            f.write_all(part)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether the run about to start may remove more than `removalLimitPercent` (or everyone,
/// after a Look that returned nothing): only a run-now run whose request the
/// [`ALLOW_REMOVAL_ANNOTATION`] repeats, and only once. True when the export removes, the
/// run-now annotation is set, not yet handled (`status.lastHandledRunRequest` differs: this
/// run answers it), and the allow-removal annotation has the same value. Later runs (the
/// request handled) are held by the limit again, even if the annotations stay.
pub fn removal_allowed_once(
    spec: &BrazeExportSpec,
    annotations: &BTreeMap<String, String>,
    status: Option<&BrazeExportStatus>,
) -> bool {
    let Some(request) = annotations
        .get(RUN_NOW_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    else {
        return false;
    };
    let handled = status.and_then(|s| s.last_handled_run_request.as_deref());
    spec.braze.removal == RemovalMode::Remove
        && annotations.get(ALLOW_REMOVAL_ANNOTATION).map(|v| v.trim()) == Some(request)
        && handled.map(str::trim) != Some(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            export: Owner {
                namespace: Some("marketing".into()),
                name: "churn-risk".into(),
            },
            identifier: IdentifierKind::ExternalId,
            alias_label: None,
            attribute: "looker_export".into(),
            export_name: "CHURN_RISK".into(),
            last_full_resync: Some("2026-11-29T06:00:00Z".parse().unwrap()),
            members: 0,
        }
    }

    fn audience(n: usize) -> Audience {
        Audience {
            header: header(),
            members: (0..n)
                .map(|i| Member {
                    id: format!("user-{i:07}"),
                    state: if i % 10 == 3 {
                        MemberState::Pending
                    } else {
                        MemberState::Flagged
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn encode_and_decode_round_trip() {
        for n in [0, 1, 1000] {
            let a = audience(n);
            let back = decode(encode(&a)).unwrap();
            assert_eq!(back.members, a.members);
            assert_eq!(back.header.members, n as u64);
            assert_eq!(
                Header {
                    members: 0,
                    ..back.header
                },
                a.header
            );
        }
    }

    #[test]
    fn a_large_audience_is_split_into_parts_under_the_secret_limit() {
        // Identifiers that compress badly: 200,000 random hex strings.
        let mut a = audience(0);
        a.members = (0..200_000)
            .map(|_| Member {
                id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
                state: MemberState::Flagged,
            })
            .collect();
        let parts = encode(&a);
        assert!(parts.len() > 1, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.len() <= MAX_PART_BYTES));
        // base64 of a part, as a Secret holds it, stays under 1 MiB
        assert!(MAX_PART_BYTES.div_ceil(3) * 4 < 1 << 20);
        let back = decode(parts).unwrap();
        assert_eq!(back.members.len(), 200_000);
        assert_eq!(back.members[1234], a.members[1234]);
    }

    #[test]
    fn ordinary_identifiers_take_a_few_bytes_each() {
        let n = 200_000;
        let mut body = BodyWriter::new(6);
        for i in 0..n {
            body.push(&format!("user-{i:07}"), MemberState::Flagged);
        }
        let e = Encoded::new(header(), body);
        assert!(e.len_bytes() < n * 4, "{} bytes", e.len_bytes());
        e.verify().unwrap();
    }

    #[test]
    fn damage_is_an_error_never_a_panic_and_names_no_user() {
        let bytes: Vec<u8> = encode(&audience(300)).concat();
        assert!(matches!(
            Encoded::from_bytes(b"hello".to_vec()),
            Err(AudienceError::NotAnAudience)
        ));
        let mut newer = bytes.clone();
        newer[4] = 9;
        assert_eq!(
            Encoded::from_bytes(newer).unwrap_err().to_string(),
            "it is of version 9, and this build reads version 1"
        );
        for cut in [3, 9, 40, bytes.len() / 2, bytes.len() - 1] {
            let r = decode(vec![bytes[..cut].to_vec()]);
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let mut errors = 0;
        for _ in 0..2000 {
            let mut b = bytes.clone();
            let i = rng.usize(..b.len());
            b[i] ^= 1 << rng.u8(..8);
            if let Err(e) = decode(vec![b]) {
                errors += 1;
                assert!(!e.to_string().contains("user-"), "{e}");
            }
        }
        assert!(errors > 1900, "{errors} of 2000 flips were caught");
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"junk");
        // Bytes after the zlib stream are not part of it; the body still reads whole.
        let _ = decode(vec![trailing]);
    }

    #[test]
    fn member_debug_hides_the_identifier() {
        let m = Member {
            id: "user-secret".into(),
            state: MemberState::Flagged,
        };
        assert_eq!(format!("{m:?}"), "Member(<11 bytes>, Flagged)");
        let e = Encoded::from_parts(encode(&audience(3))).unwrap();
        assert!(!format!("{e:?}").contains("user-"));
    }

    #[test]
    fn another_export_or_identifier_type_is_refused() {
        let h = header();
        let me = h.export.clone();
        assert!(h.check(&me, IdentifierKind::ExternalId, None).is_ok());
        let other = Owner {
            namespace: Some("marketing".into()),
            name: "vip".into(),
        };
        assert_eq!(
            h.check(&other, IdentifierKind::ExternalId, None)
                .unwrap_err(),
            "it belongs to the export marketing/churn-risk, not marketing/vip"
        );
        assert_eq!(
            h.check(&me, IdentifierKind::BrazeId, None).unwrap_err(),
            "it holds external_id identifiers, and this export uses braze_id"
        );
        let alias = Header {
            identifier: IdentifierKind::UserAlias,
            alias_label: Some("a".into()),
            ..header()
        };
        assert!(
            alias
                .check(&me, IdentifierKind::UserAlias, Some("a"))
                .is_ok()
        );
        assert!(
            alias
                .check(&me, IdentifierKind::UserAlias, Some("b"))
                .is_err()
        );
    }

    #[test]
    fn files_are_written_atomically_and_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        assert!(read_file(&path).unwrap().is_none());
        let e = Encoded::from_parts(encode(&audience(5))).unwrap();
        write_file(&path, &e).unwrap();
        let back = read_file(&path).unwrap().unwrap();
        assert_eq!(back, e);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn removal_is_allowed_once_by_the_run_now_request_it_repeats() {
        let yaml = r#"
schedule: "0 6 * * *"
looker: {baseUrl: "https://x.looker.com", lookId: "1", credentialsSecretRef: {name: l}}
braze: {endpoint: "https://rest.iad-01.braze.com", apiKeySecretRef: {name: b}, removal: Remove}
"#;
        let spec: BrazeExportSpec = serde_saphyr::from_str(yaml).unwrap();
        let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let both = ann(&[(RUN_NOW_ANNOTATION, "t1"), (ALLOW_REMOVAL_ANNOTATION, "t1")]);
        let handled = |v: &str| BrazeExportStatus {
            last_handled_run_request: Some(v.into()),
            ..BrazeExportStatus::default()
        };
        assert!(removal_allowed_once(&spec, &both, None));
        assert!(removal_allowed_once(&spec, &both, Some(&handled("t0"))));
        assert!(
            !removal_allowed_once(&spec, &both, Some(&handled("t1"))),
            "once: the request was handled"
        );
        let stale = ann(&[(RUN_NOW_ANNOTATION, "t2"), (ALLOW_REMOVAL_ANNOTATION, "t1")]);
        assert!(!removal_allowed_once(&spec, &stale, Some(&handled("t1"))));
        assert!(!removal_allowed_once(
            &spec,
            &ann(&[(ALLOW_REMOVAL_ANNOTATION, "t1")]),
            None
        ));
        assert!(!removal_allowed_once(
            &spec,
            &ann(&[(RUN_NOW_ANNOTATION, ""), (ALLOW_REMOVAL_ANNOTATION, "")]),
            None
        ));
        let mut keep = spec.clone();
        keep.braze.removal = RemovalMode::Keep;
        assert!(!removal_allowed_once(&keep, &both, None));
    }
}
