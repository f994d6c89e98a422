//! Sorting more than fits in memory: records are held up to a budget, then sorted and
//! written to a run file in the scratch directory, and read back merged, in key order.
//!
//! Run files are anonymous (`O_TMPFILE` where the system has it, else unlinked at once): a
//! crash leaves nothing behind, and dropping the sorter frees the disk. Records compare by
//! their key bytes; equal keys come out in the order they were pushed (each run is sorted
//! stably, and the merge breaks ties by run, the runs being in push order).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where run files go.
#[derive(Clone, Debug)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Run files in `dir` (`None`: the system's temporary directory).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir: dir.unwrap_or_else(std::env::temp_dir),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self) -> Result<File, SpillError> {
        tempfile::tempfile_in(&self.dir).map_err(|e| self.error("creating a spill file", e))
    }

    fn error(&self, doing: &'static str, source: io::Error) -> SpillError {
        SpillError::Io {
            dir: self.dir.clone(),
            doing,
            source,
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new(None)
    }
}

/// A record that can be sorted through run files.
pub trait Record: Sized + Send {
    /// The bytes records sort by (ties keep the push order).
    fn key(&self) -> &[u8];
    /// Appends its serialised form.
    fn write(&self, out: &mut Vec<u8>);
    /// Its inverse; `None`: damaged.
    fn read(bytes: &[u8]) -> Option<Self>;
    /// Heap memory it holds (its own size is counted apart), for the budget.
    fn heap_bytes(&self) -> usize;
}

/// Why a sort through the scratch directory failed. Names the directory and the cause,
/// never a record.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// A run file could not be created, written or read (a full disk, an unwritable
    /// directory).
    #[error("the scratch directory {}: {doing} failed: {source}", dir.display())]
    Io {
        /// The scratch directory.
        dir: PathBuf,
        /// What was being done.
        doing: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// A run file read back is not what was written.
    #[error("the scratch directory {}: a spill file read back is damaged", .0.display())]
    Damaged(PathBuf),
}

impl SpillError {
    /// The reason, for conditions and metrics.
    pub fn reason(&self) -> &'static str {
        "ScratchFailed"
    }
}

/// Runs merged at once; more are first merged into larger runs (each open run holds a read
/// buffer).
const FAN_IN: usize = 64;
/// Read and write buffer of one run file.
const IO_BUFFER: usize = 64 * 1024;

/// Sorts records in bounded memory (see the module's header).
pub struct Sorter<R: Record> {
    scratch: Scratch,
    budget: usize,
    held: Vec<R>,
    held_bytes: usize,
    runs: Vec<File>,
    len: u64,
}

impl<R: Record> std::fmt::Debug for Sorter<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sorter")
            .field("len", &self.len)
            .field("runs", &self.runs.len())
            .finish_non_exhaustive()
    }
}

impl<R: Record> Sorter<R> {
    /// A sorter holding at most about `budget` bytes of records before it spills.
    pub fn new(scratch: &Scratch, budget: usize) -> Self {
        Self {
            scratch: scratch.clone(),
            budget: budget.max(1),
            held: Vec::new(),
            held_bytes: 0,
            runs: Vec::new(),
            len: 0,
        }
    }

    /// Adds a record; writes a sorted run when the budget is exceeded.
    pub fn push(&mut self, r: R) -> Result<(), SpillError> {
        self.held_bytes += r.heap_bytes() + std::mem::size_of::<R>();
        self.held.push(r);
        self.len += 1;
        if self.held_bytes >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    /// Records pushed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Run files written so far.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    fn spill(&mut self) -> Result<(), SpillError> {
        self.held.sort_by(|a, b| a.key().cmp(b.key()));
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let file = write_run(
            &self.scratch,
            self.scratch.file()?,
            held.into_iter().map(Ok),
        )?;
        self.runs.push(file);
        Ok(())
    }

    /// Every record, in key order.
    pub fn finish(mut self) -> Result<Sorted<R>, SpillError> {
        self.held.sort_by(|a, b| a.key().cmp(b.key()));
        let held = std::mem::take(&mut self.held).into_iter();
        if self.runs.is_empty() {
            return Ok(Sorted(Inner::Memory(held)));
        }
        // Too many to merge at once: whole passes, each merging neighbouring groups of runs
        // into one, so a record is written again only once a pass (log₆₄ of the runs in
        // all). The runs stay in push order, so ties keep it.
        let mut runs = std::mem::take(&mut self.runs);
        while runs.len() >= FAN_IN {
            let mut merged = Vec::with_capacity(runs.len().div_ceil(FAN_IN));
            let mut rest = runs.into_iter();
            loop {
                let group: Vec<File> = rest.by_ref().take(FAN_IN).collect();
                if group.is_empty() {
                    break;
                }
                let records = Merge::<R>::new(&self.scratch, group, None)?;
                merged.push(write_run(&self.scratch, self.scratch.file()?, records)?);
            }
            runs = merged;
        }
        Ok(Sorted(Inner::Merge(Merge::new(
            &self.scratch,
            runs,
            Some(held),
        )?)))
    }
}

/// Writes records (already in order) into a new run file, rewound for reading.
fn write_run<R: Record>(
    scratch: &Scratch,
    file: File,
    records: impl Iterator<Item = Result<R, SpillError>>,
) -> Result<File, SpillError> {
    let mut w = BufWriter::with_capacity(IO_BUFFER, file);
    let mut buf = Vec::new();
    for r in records {
        buf.clear();
        r?.write(&mut buf);
        let mut len = [0u8; 10];
        let n = varint(buf.len() as u64, &mut len);
        w.write_all(&len[..n])
            .and_then(|()| w.write_all(&buf))
            .map_err(|e| scratch.error("writing a spill file", e))?;
    }
    let mut file = w
        .into_inner()
        .map_err(|e| scratch.error("writing a spill file", e.into_error()))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| scratch.error("reading a spill file", e))?;
    Ok(file)
}

/// The records of a finished sort, in key order (an iterator).
pub struct Sorted<R: Record>(Inner<R>);

enum Inner<R: Record> {
    Memory(std::vec::IntoIter<R>),
    Merge(Merge<R>),
}

impl<R: Record> Iterator for Sorted<R> {
    type Item = Result<R, SpillError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Inner::Memory(it) => it.next().map(Ok),
            Inner::Merge(m) => m.next(),
        }
    }
}

/// A k-way merge of run files (and the records still in memory, the last run).
struct Merge<R: Record> {
    scratch: Scratch,
    readers: Vec<BufReader<File>>,
    memory: Option<std::vec::IntoIter<R>>,
    heap: BinaryHeap<Head<R>>,
    buf: Vec<u8>,
    failed: bool,
}

/// The next record of one run; the heap's top is the least key, then the earliest run.
struct Head<R> {
    record: R,
    run: usize,
}

impl<R: Record> PartialEq for Head<R> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<R: Record> Eq for Head<R> {}
impl<R: Record> PartialOrd for Head<R> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<R: Record> Ord for Head<R> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.record.key(), other.run).cmp(&(self.record.key(), self.run))
    }
}

impl<R: Record> Merge<R> {
    fn new(
        scratch: &Scratch,
        files: Vec<File>,
        memory: Option<std::vec::IntoIter<R>>,
    ) -> Result<Self, SpillError> {
        let mut m = Self {
            scratch: scratch.clone(),
            readers: files
                .into_iter()
                .map(|f| BufReader::with_capacity(IO_BUFFER, f))
                .collect(),
            memory,
            heap: BinaryHeap::new(),
            buf: Vec::new(),
            failed: false,
        };
        for run in 0..=m.readers.len() {
            if let Some(record) = m.read(run)? {
                m.heap.push(Head { record, run });
            }
        }
        Ok(m)
    }

    /// The next record of run `run` (the last index: the records in memory).
    fn read(&mut self, run: usize) -> Result<Option<R>, SpillError> {
        let Some(reader) = self.readers.get_mut(run) else {
            return Ok(self.memory.as_mut().and_then(Iterator::next));
        };
        let len = match read_varint(reader) {
            Ok(None) => return Ok(None),
            Ok(Some(len)) if len <= 1 << 30 => len as usize,
            Ok(Some(_)) => return Err(SpillError::Damaged(self.scratch.dir.clone())),
            Err(e) => return Err(self.scratch.error("reading a spill file", e)),
        };
        self.buf.resize(len, 0);
        reader
            .read_exact(&mut self.buf)
            .map_err(|e| self.scratch.error("reading a spill file", e))?;
        R::read(&self.buf)
            .map(Some)
            .ok_or_else(|| SpillError::Damaged(self.scratch.dir.clone()))
    }
}

impl<R: Record> Iterator for Merge<R> {
    type Item = Result<R, SpillError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let Head { record, run } = self.heap.pop()?;
        match self.read(run) {
            Ok(Some(next)) => self.heap.push(Head { record: next, run }),
            Ok(None) => {}
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        }
        Some(Ok(record))
    }
}

/// LEB128: writes `n` into `out`, returns the bytes used.
fn varint(mut n: u64, out: &mut [u8; 10]) -> usize {
    let mut i = 0;
    loop {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out[i] = b;
            return i + 1;
        }
        out[i] = b | 0x80;
        i += 1;
    }
}

/// Reads a LEB128 number; `None` at a clean end of the file.
fn read_varint(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut value = 0u64;
    for (i, shift) in (0..64).step_by(7).enumerate() {
        let mut b = [0u8; 1];
        if r.read(&mut b)? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        value |= u64::from(b[0] & 0x7F) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(io::ErrorKind::InvalidData.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key and the order it was pushed in.
    #[derive(Debug, PartialEq, Eq, Clone)]
    struct Rec(Vec<u8>, u32);

    impl Record for Rec {
        fn key(&self) -> &[u8] {
            &self.0
        }
        fn write(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.1.to_le_bytes());
            out.extend_from_slice(&self.0);
        }
        fn read(bytes: &[u8]) -> Option<Self> {
            let (n, key) = bytes.split_at_checked(4)?;
            Some(Rec(key.to_vec(), u32::from_le_bytes(n.try_into().ok()?)))
        }
        fn heap_bytes(&self) -> usize {
            self.0.len()
        }
    }

    fn records(n: u32) -> Vec<Rec> {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..n)
            .map(|i| Rec(rng.u32(..n / 3 + 1).to_be_bytes().to_vec(), i))
            .collect()
    }

    fn sorted(input: &[Rec], budget: usize) -> (Vec<Rec>, usize) {
        let scratch = Scratch::default();
        let mut s = Sorter::new(&scratch, budget);
        for r in input {
            s.push(r.clone()).unwrap();
        }
        assert_eq!(s.len(), input.len() as u64);
        let runs = s.runs();
        (s.finish().unwrap().map(Result::unwrap).collect(), runs)
    }

    #[test]
    fn sorts_by_key_and_keeps_the_push_order_of_equal_keys() {
        let input = records(20_000);
        let mut want = input.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        for budget in [usize::MAX, 100_000, 3_000, 500] {
            let (got, runs) = sorted(&input, budget);
            assert_eq!(got, want, "budget {budget}");
            assert_eq!(
                runs > 0,
                budget < usize::MAX,
                "budget {budget}: {runs} runs"
            );
        }
        // 500 bytes is a run every 12 records: far more runs than are merged at once.
        assert!(sorted(&input, 500).1 > FAN_IN * 10);
    }

    #[test]
    fn nothing_pushed_is_nothing_sorted() {
        assert!(sorted(&[], 10).0.is_empty());
    }

    #[test]
    fn an_unusable_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let scratch = Scratch::new(Some(missing.clone()));
        let mut s = Sorter::new(&scratch, 10);
        let err = s.push(Rec(vec![1; 20], 0)).unwrap_err();
        assert_eq!(err.reason(), "ScratchFailed");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "the scratch directory {}: creating a spill file failed: ",
                missing.display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn a_full_disk_is_an_error_not_a_short_sort() {
        // /dev/full refuses every write with ENOSPC, as a full emptyDir does.
        let full = File::options().write(true).open("/dev/full").unwrap();
        let records = (0..100_000u32).map(|i| Ok(Rec(i.to_be_bytes().to_vec(), i)));
        let err = write_run(&Scratch::default(), full, records).unwrap_err();
        assert!(
            err.to_string()
                .contains("writing a spill file failed: No space left on device"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_run_is_an_error() {
        let scratch = Scratch::default();
        let mut file = scratch.file().unwrap();
        file.write_all(&[5, 1, 2]).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut m: Merge<Rec> = match Merge::new(&scratch, vec![file], None) {
            Ok(m) => m,
            Err(e) => {
                assert!(e.to_string().contains("reading a spill file failed"), "{e}");
                return;
            }
        };
        assert!(m.next().unwrap().is_err());
    }

    #[test]
    fn varints_round_trip() {
        for n in [0u64, 1, 127, 128, 1 << 35, u64::MAX] {
            let mut out = [0u8; 10];
            let used = varint(n, &mut out);
            assert_eq!(read_varint(&mut &out[..used]).unwrap(), Some(n));
        }
        assert_eq!(read_varint(&mut &[][..]).unwrap(), None);
        assert!(read_varint(&mut &[0x80][..]).is_err());
    }
}
