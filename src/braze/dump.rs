//! `--dump-payloads`: every request body written as one JSON line.

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
    /// Creates (truncates) the file.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: Mutex::new(BufWriter::new(File::create(path)?)),
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
