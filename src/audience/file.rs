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
