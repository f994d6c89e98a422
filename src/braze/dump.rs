//! `--dump-payloads`: every request body written as one JSON line, in a private file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

/// A file that receives each distinct request body (retries are not written twice).
#[derive(Debug)]
pub struct PayloadDump {
    file: Mutex<BufWriter<File>>,
}

impl PayloadDump {
    /// Creates the file as a new one, readable by its owner only (the bodies hold personal
    /// data), before the run starts: a temporary beside `path` (see [`crate::private_file`])
    /// renamed over it at once, so the dump grows at `path` while the run goes on. A regular
    /// file at `path` (a dump of an earlier run) is replaced, never written into: its old
    /// contents stay where other links keep them. Anything else there (a symbolic link, a
    /// directory, a device, a pipe) is refused: never written through, never replaced.
    pub fn create(path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::other(
                    "refused: the path is a symbolic link (a dump is never written through one); name a regular file or a new one",
                ));
            }
            Ok(m) if !m.is_file() => {
                return Err(io::Error::other(
                    "refused: the path is not a regular file; name a regular file or a new one",
                ));
            }
            _ => {}
        }
        let (file, tmp) = crate::private_file::create_beside(path)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Self {
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    /// Writes one body and a newline.
    pub fn write(&self, body: &[u8]) -> io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(body)?;
        f.write_all(b"\n")
    }

    /// Flushes buffered lines.
    pub fn flush(&self) -> io::Result<()> {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_dump_is_a_new_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payloads.jsonl");
        let dump = PayloadDump::create(&path).unwrap();
        dump.write(b"{}").unwrap();
        dump.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    /// A file there before (world-readable, someone else's or an earlier dump) is replaced
    /// by a new private one: what it holds is not written into (a hard link still shows it).
    #[test]
    fn an_existing_file_is_replaced_not_written_into() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payloads.jsonl");
        std::fs::write(&path, "theirs\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let other_link = dir.path().join("theirs");
        std::fs::hard_link(&path, &other_link).unwrap();
        let dump = PayloadDump::create(&path).unwrap();
        dump.write(b"{}").unwrap();
        dump.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&other_link).unwrap(), "theirs\n");
        assert_eq!(mode(&other_link), 0o644);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_symbolic_link_or_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("payloads.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = PayloadDump::create(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(PayloadDump::create(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());
        let e = PayloadDump::create(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 3, "no temporary file left behind");
    }
}
