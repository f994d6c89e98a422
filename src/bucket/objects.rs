//! One stored audience in a bucket, under its directory `D` (`<prefix>/<uid>` for an
//! export of the controller, the `--state` key for `run`):
//!
//! - `D/audience-<g>`: generation g, the audience's file form (the concatenation of its
//!   [`Encoded::parts`]), written by a multipart upload fed part by part, never rewritten;
//! - `D/manifest.json`: written last, the generation in force, its members, and each part's
//!   size and CRC-32;
//! - `D/pending-<n>`: a pending record of a run (see [`super::pending`]).
//!
//! The rules are those of the Secrets store ([`crate::controller::audience_store`]): a save
//! first deletes every generation but the one in force (a failed or crashed save's), writes a
//! new generation under a new name, then the manifest, then deletes the generation it
//! replaced: never more than two at once. A load reads the generation the manifest names,
//! chunk by chunk from the response stream, and checks each part's size and checksum and the
//! member count: it never mixes generations. The directory is named by the export's uid, so
//! an export deleted and recreated under its name never reads nor overwrites its
//! namesake's; the writer's fence is checked between [`AudienceObjects::stage`] and
//! [`AudienceObjects::commit`] by the caller.

use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};

use super::{Bucket, BucketError, describe};
use crate::audience::{AudienceError, Encoded, MAX_PART_BYTES};
use crate::spill::Scratch;

const MANIFEST: &str = "manifest.json";
const GENERATION_PREFIX: &str = "audience-";
pub(super) const PENDING_PREFIX: &str = "pending-";
/// Bytes a multipart upload sends at once (S3 wants at least 5 MiB a part but the last).
const UPLOAD_CHUNK: usize = 8 << 20;
/// Chunks in flight at once.
const UPLOAD_CONCURRENCY: usize = 2;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    version: u32,
    generation: u64,
    members: u64,
    object: String,
    parts: Vec<PartRef>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartRef {
    bytes: usize,
    crc32: u32,
}

/// The objects of one stored audience.
#[derive(Clone, Debug)]
pub struct AudienceObjects {
    pub(super) bucket: Bucket,
    pub(super) dir: Path,
    /// Where a loaded audience is kept while a run reads it (never in memory).
    scratch: Scratch,
}

/// A generation written but not yet in force: [`AudienceObjects::commit`] puts it in force,
/// [`AudienceObjects::abandon`] deletes it.
#[derive(Debug)]
pub struct Staged {
    manifest: Manifest,
    replaced: Vec<Path>,
}

impl AudienceObjects {
    pub(super) fn new(bucket: Bucket, dir: Path) -> Self {
        Self {
            bucket,
            dir,
            scratch: Scratch::default(),
        }
    }

    /// Loads audiences into a file in `scratch` (default: the system's temporary directory).
    pub fn with_scratch(mut self, scratch: Scratch) -> Self {
        self.scratch = scratch;
        self
    }

    /// `s3://bucket/dir`, for messages.
    pub fn shown(&self) -> String {
        self.bucket.shown(&self.dir)
    }

    pub(super) fn path(&self, name: &str) -> Path {
        self.dir.clone().join(name)
    }

    pub(super) fn failed(
        &self,
        action: &'static str,
        path: &Path,
    ) -> impl Fn(object_store::Error) -> BucketError {
        let object = self.bucket.shown(path);
        move |e| BucketError::Request {
            action,
            object: object.clone(),
            why: describe(&e),
        }
    }

    /// The objects under the directory, by name (the last path segment), sorted.
    pub(super) async fn list(&self) -> Result<Vec<(String, Path)>, BucketError> {
        let prefix = self.dir.clone();
        let mut found = Vec::new();
        let mut listing = self.bucket.store().list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(self.failed("list", &prefix))?;
            let Some(rest) = meta.location.prefix_match(&prefix) else {
                continue;
            };
            let parts: Vec<_> = rest.collect();
            // Only the directory's own objects: never another audience's below it.
            if let [one] = parts.as_slice() {
                found.push((one.as_ref().to_owned(), meta.location.clone()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The bytes of `path`, `None` when it does not exist.
    pub(super) async fn read_whole(&self, path: &Path) -> Result<Option<Vec<u8>>, BucketError> {
        match self.bucket.store().get(path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(self.failed("read", path))?;
                Ok(Some(bytes.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed("read", path)(e)),
        }
    }

    async fn read_manifest(&self) -> Result<Option<Manifest>, BucketError> {
        let path = self.path(MANIFEST);
        let Some(bytes) = self.read_whole(&path).await? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|_| {
            BucketError::Damaged(format!(
                "the manifest {} is unreadable",
                self.bucket.shown(&path)
            ))
        })?;
        Ok(Some(m))
    }

    /// Loads the stored audience: `None` when there is none yet. The generation's object is
    /// read as a stream into an anonymous file in the scratch directory, each part checked
    /// against the manifest as it passes: an audience of any size costs no memory.
    pub async fn load(&self) -> Result<Option<Encoded>, BucketError> {
        let Some(m) = self.read_manifest().await? else {
            return Ok(None);
        };
        let path = self.path(&m.object);
        let shown = self.bucket.shown(&path);
        let stream = match self.bucket.store().get(&path).await {
            Ok(r) => r.into_stream(),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BucketError::Damaged(format!(
                    "{shown}, named by the manifest, is missing"
                )));
            }
            Err(e) => return Err(self.failed("read", &path)(e)),
        };
        let mut file = tempfile::tempfile_in(self.scratch.dir())
            .map_err(|e| self.scratch_failed("creating a file for the audience", e))?;
        read_into(
            stream,
            &m.parts,
            &shown,
            self.failed("read", &path),
            &mut file,
        )
        .await?
        .map_err(|e| self.scratch_failed("writing the audience", e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| self.scratch_failed("reading the audience", e))?;
        let encoded = Encoded::from_file(file, self.scratch.dir())?;
        if encoded.header().members != m.members {
            return Err(BucketError::Damaged(format!(
                "the manifest and {shown} disagree on the audience's size"
            )));
        }
        Ok(Some(encoded))
    }

    /// Writes `audience` as a new generation, after deleting every generation but the one in
    /// force (a failure to delete one fails the save: never three generations at once).
    pub async fn stage(&self, audience: &Encoded) -> Result<Staged, BucketError> {
        let in_force = self.read_manifest().await?.map(|m| m.generation);
        let mut highest = in_force.unwrap_or(0);
        let mut replaced = Vec::new();
        for (name, path) in self.list().await? {
            let Some(g) = generation_of(&name) else {
                continue;
            };
            highest = highest.max(g);
            if Some(g) == in_force {
                replaced.push(path);
            } else {
                self.delete(&path).await?;
            }
        }
        // Above every generation seen, finished or not: a crashed save's object is never reused.
        let generation = highest + 1;
        let object = generation_name(generation);
        let parts = self.upload(&self.path(&object), audience).await?;
        Ok(Staged {
            manifest: Manifest {
                version: 1,
                generation,
                members: audience.header().members,
                object,
                parts,
            },
            replaced,
        })
    }

    /// Streams the encoded audience (from memory or its file, [`Encoded::reader`]) into one
    /// object by a multipart upload (aborted on failure), part by part.
    async fn upload(&self, path: &Path, audience: &Encoded) -> Result<Vec<PartRef>, BucketError> {
        let failed = self.failed("write", path);
        let upload = self
            .bucket
            .store()
            .put_multipart(path)
            .await
            .map_err(&failed)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, UPLOAD_CHUNK);
        let mut refs = Vec::new();
        let mut reader = audience.reader();
        let mut part = vec![0u8; MAX_PART_BYTES];
        loop {
            let n = match read_full(&mut reader, &mut part) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(self.scratch_failed("reading the audience", e));
                }
            };
            if let Err(e) = w.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                let _ = w.abort().await;
                return Err(failed(e));
            }
            w.write(&part[..n]);
            refs.push(PartRef {
                bytes: n,
                crc32: crc32fast::hash(&part[..n]),
            });
        }
        w.finish().await.map_err(&failed)?;
        Ok(refs)
    }

    fn scratch_failed(&self, doing: &str, e: std::io::Error) -> BucketError {
        BucketError::Audience(AudienceError::Scratch(format!(
            "the scratch directory {}: {doing} failed: {e}",
            self.scratch.dir().display()
        )))
    }

    /// Puts a staged generation in force (the manifest, one write), then deletes the one it
    /// replaced (a failure there is only logged: the next save deletes it).
    pub async fn commit(&self, staged: Staged) -> Result<(), BucketError> {
        let path = self.path(MANIFEST);
        let body = serde_json::to_vec(&staged.manifest).unwrap_or_default();
        self.bucket
            .store()
            .put(&path, PutPayload::from(body))
            .await
            .map_err(self.failed("write", &path))?;
        for old in staged.replaced {
            if let Err(e) = self.delete(&old).await {
                tracing::warn!(error = %e, "cannot delete an old audience generation");
            }
        }
        Ok(())
    }

    /// Deletes a staged generation that is not to be put in force (a failure is only
    /// logged: the next save deletes it).
    pub async fn abandon(&self, staged: Staged) {
        let path = self.path(&staged.manifest.object);
        if let Err(e) = self.delete(&path).await {
            tracing::warn!(error = %e, "cannot delete an unused audience generation");
        }
    }

    /// [`stage`](Self::stage), then [`commit`](Self::commit): a save with no fence.
    pub async fn save(&self, audience: &Encoded) -> Result<(), BucketError> {
        let staged = self.stage(audience).await?;
        self.commit(staged).await
    }

    /// Deletes every object of the audience (its pending records too). Goes through every
    /// object before it answers the first failure.
    pub async fn delete_all(&self) -> Result<(), BucketError> {
        let mut first_error = None;
        let mut objects = self.list().await?;
        // The manifest first: what remains after a failure is garbage, never an audience.
        objects.sort_by_key(|(name, _)| name != MANIFEST);
        for (_, path) in objects {
            if let Err(e) = self.delete(&path).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deletes one object; one already gone is no failure.
    pub(super) async fn delete(&self, path: &Path) -> Result<(), BucketError> {
        match self.bucket.store().delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("delete", path)(e)),
        }
    }
}

fn generation_name(generation: u64) -> String {
    format!("{GENERATION_PREFIX}{generation:020}")
}

fn generation_of(name: &str) -> Option<u64> {
    name.strip_prefix(GENERATION_PREFIX)?.parse().ok()
}

/// Reads as much of `r` as fills `buf` (less only at its end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes a stream of chunks into `file`, checking it against the parts the manifest lists
/// as it passes (each part's size and checksum). The outer error is the bucket's or the
/// object's; the inner one, the file's.
async fn read_into<S, E>(
    mut stream: S,
    expected: &[PartRef],
    shown: &str,
    failed: E,
    file: &mut File,
) -> Result<std::io::Result<()>, BucketError>
where
    S: futures_util::Stream<Item = object_store::Result<bytes::Bytes>> + Unpin,
    E: Fn(object_store::Error) -> BucketError,
{
    let damaged = |what: String| BucketError::Damaged(format!("{shown} {what}"));
    let mut w = BufWriter::with_capacity(256 * 1024, file);
    let mut wanted = expected.iter().enumerate();
    // The part being read: its index and size, the bytes so far and their checksum.
    let mut current = wanted
        .next()
        .map(|(i, p)| (i, p, 0usize, crc32fast::Hasher::new()));
    while let Some(chunk) = stream.next().await {
        let mut chunk: &[u8] = &chunk.map_err(&failed)?;
        while !chunk.is_empty() {
            let Some((_, part, got, crc)) = current.as_mut() else {
                return Err(damaged("is longer than its manifest says".into()));
            };
            let n = (part.bytes - *got).min(chunk.len());
            crc.update(&chunk[..n]);
            if let Err(e) = w.write_all(&chunk[..n]) {
                return Ok(Err(e));
            }
            *got += n;
            chunk = &chunk[n..];
            if *got == part.bytes {
                let (i, part, _, crc) = current.take().expect("a part in the making");
                if crc.finalize() != part.crc32 {
                    return Err(damaged(format!("does not match its checksum (part {i})")));
                }
                current = wanted
                    .next()
                    .map(|(i, p)| (i, p, 0, crc32fast::Hasher::new()));
            }
        }
    }
    if current.is_some() {
        return Err(damaged("is shorter than its manifest says".into()));
    }
    Ok(w.flush())
}
