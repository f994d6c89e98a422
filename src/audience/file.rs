//! The `run` command's state file: the encoded audience in one file, replaced atomically.

use std::io::{self, Write};
use std::path::Path;

use super::codec::AudienceError;
use super::encoded::Encoded;

/// Reads a state file: `None` when there is none yet (the first run creates it).
pub fn read_file(path: &Path) -> Result<Option<Encoded>, AudienceError> {
    match std::fs::read(path) {
        Ok(bytes) => Encoded::from_bytes(bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes a state file atomically: a new temporary file beside it (see
/// [`crate::private_file`]: readable by its owner only, since it holds personal data; never
/// through a symbolic link, never a file someone made beforehand), flushed to disk, then
/// renamed over it. A crash leaves the old file or the new one, never a mix.
pub fn write_file(path: &Path, encoded: &Encoded) -> io::Result<()> {
    let (mut f, tmp) = crate::private_file::create_beside(path)?;
    let result = (|| {
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
