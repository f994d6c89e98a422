//! Files that hold personal data (`run --state`, `--dump-payloads`): created new, readable by
//! their owner only, never through a symbolic link, and never someone else's file reused.
//!
//! Each is first made as a temporary beside its path, with a name nobody can guess (the
//! process id and a random suffix), opened `O_CREAT | O_EXCL | O_NOFOLLOW` with mode 0600;
//! renaming it over the path then replaces whatever was there (a symbolic link itself, never
//! its target; a file's old contents stay where other links to it keep them).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// A new file readable and writable by its owner only, beside `path` (same directory, so a
/// rename over `path` is atomic), named `.NAME.tmp-PID-RANDOM`; the file and its name.
pub fn create_beside(path: &Path) -> io::Result<(File, PathBuf)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let mut tries = 0;
    loop {
        let tmp = dir.join(format!(
            ".{name}.tmp-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        match create_new(&tmp) {
            // Only someone guessing names gets here: take another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 3 => tries += 1,
            result => return result.map(|f| (f, tmp)),
        }
    }
}

/// Opens `path` as a new file (refused when anything, a dangling symbolic link included, is
/// there), mode 0600.
pub fn create_new(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(path)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_temporary_is_new_private_and_beside_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        let (mut f, tmp) = create_beside(&path).unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(tmp.parent(), Some(dir.path()));
        let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!(".state.bin.tmp-{}-", std::process::id())),
            "{name}"
        );
        let mode = std::fs::metadata(&tmp).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, other) = create_beside(&path).unwrap();
        assert_ne!(tmp, other, "two temporaries never share a name");
    }

    #[test]
    fn an_existing_file_or_link_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::write(&theirs, "keep").unwrap();
        let e = create_new(&theirs).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        assert!(create_new(&link).is_err());
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(create_new(&dangling).is_err());
        assert!(
            !dir.path().join("nowhere").exists(),
            "no file made through the link"
        );
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "keep");
    }
}
