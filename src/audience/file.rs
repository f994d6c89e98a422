//! The `run` command's state file: the encoded audience in one file, read lazily (never
//! held whole) and replaced atomically;
//! and beside it the pending records of runs that stopped before they saved
//! (`STATE.pending-N`, each written whole like the state file), deleted once a run saved.

use std::io;
use std::path::{Path, PathBuf};

use super::codec::AudienceError;
use super::encoded::Encoded;

/// Reads a state file: `None` when there is none yet (the first run creates it).
pub fn read_file(path: &Path) -> Result<Option<Encoded>, AudienceError> {
    match std::fs::File::open(path) {
        Ok(file) => Encoded::from_file(file, path).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The path of pending record `n` (`STATE.pending-N`, zero-padded so that names sort).
pub fn pending_path(state: &Path, n: u64) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(format!(".pending-{n:020}"));
    PathBuf::from(name)
}

/// The pending records beside a state file, oldest first.
pub fn pending_files(state: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = match state.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = state.file_name() else {
        return Ok(Vec::new());
    };
    let prefix = format!("{}.pending-", name.to_string_lossy());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.strip_prefix(&prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Reads the pending records beside a state file, each checked whole, with their paths.
pub fn read_pending(state: &Path) -> Result<Vec<(PathBuf, Encoded)>, AudienceError> {
    let mut records = Vec::new();
    for path in pending_files(state)? {
        if let Some(record) = read_file(&path)? {
            record.verify()?;
            records.push((path, record));
        }
    }
    Ok(records)
}

/// Deletes pending records (those a run read and wrote, once it saved the state file).
pub fn remove_pending(paths: &[PathBuf]) -> io::Result<()> {
    for path in paths {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Writes a state file atomically: a new temporary file beside it (see
/// [`crate::private_file`]: readable by its owner only, since it holds personal data; never
/// through a symbolic link, never a file someone made beforehand), flushed to disk, then
/// renamed over it. A crash leaves the old file or the new one, never a mix. An audience
/// built beside it ([`super::Output::Beside`]) is that temporary already: it is flushed and
/// renamed, never copied.
pub fn write_file(path: &Path, encoded: &Encoded) -> io::Result<()> {
    encoded.save_as(path)
}
