//! Writing an audience whose members come in any order (as a run takes its users): they are
//! sorted by identifier through the scratch directory ([`crate::spill`]), held in memory up
//! to a budget, and come out merged into the sorted body of version 3
//! ([`super::codec::Encoder`]). A user written more than once is one member: pending wins
//! over flagged, a known fingerprint over 0.
//!
//! Pushing never fails: the first failure (the scratch directory full or unwritable, an
//! identifier that cannot be stored) is kept, later members are dropped, and finishing the
//! body gives that failure. So a run learns of it once, with its reason, and never writes a
//! body that silently lacks members.

use std::io::Write;

use super::codec::{AudienceError, Encoder, LEVEL, MAX_ID_BYTES, packed_len};
use super::header::MemberState;
use crate::spill::{Record, Scratch, Sorter};

/// Members in any order, written as a sorted body once finished (see the module's header).
pub struct BodyWriter {
    sorter: Sorter<Entry>,
    level: u32,
    failed: Option<AudienceError>,
    count: u64,
    bound: usize,
}

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWriter")
            .field("count", &self.count)
            .field("failed", &self.failed.is_some())
            .finish_non_exhaustive()
    }
}

/// Bytes of members a spilling writer holds before it writes a sorted run (about 60 bytes
/// a UUID member: some 280,000 of them).
pub const WRITER_BUDGET: usize = 16 << 20;

/// A member waiting to be sorted: the identifier's bytes, then one byte (bit 0: pending;
/// the rest: the caller's tag), then the fingerprint (u32 LE). One allocation a member.
struct Entry(Box<[u8]>);

const TRAILER: usize = 5;

impl Entry {
    fn new(id: &str, state: MemberState, fingerprint: u32, tag: u8) -> Self {
        let mut b = Vec::with_capacity(id.len() + TRAILER);
        b.extend_from_slice(id.as_bytes());
        b.push(state as u8 | tag << 1);
        b.extend_from_slice(&fingerprint.to_le_bytes());
        Self(b.into_boxed_slice())
    }

    fn id(&self) -> &str {
        std::str::from_utf8(self.key()).unwrap_or_default()
    }

    fn state(&self) -> MemberState {
        if self.0[self.0.len() - TRAILER] & 1 == 1 {
            MemberState::Pending
        } else {
            MemberState::Flagged
        }
    }

    fn tag(&self) -> u8 {
        self.0[self.0.len() - TRAILER] >> 1
    }

    fn fingerprint(&self) -> u32 {
        let mut fp = [0u8; 4];
        fp.copy_from_slice(&self.0[self.0.len() - 4..]);
        u32::from_le_bytes(fp)
    }
}

impl Record for Entry {
    fn key(&self) -> &[u8] {
        &self.0[..self.0.len() - TRAILER]
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }

    fn read(bytes: &[u8]) -> Option<Self> {
        let id = bytes.get(..bytes.len().checked_sub(TRAILER)?)?;
        std::str::from_utf8(id).ok()?;
        (!id.is_empty()).then(|| Self(bytes.into()))
    }

    fn heap_bytes(&self) -> usize {
        // With the allocator's own bookkeeping.
        self.0.len() + 16
    }
}

impl BodyWriter {
    /// A writer that holds every member in memory (records, tests, small audiences),
    /// compressing at `level`; it never touches the disk, so it never fails but for an
    /// identifier that cannot be stored.
    pub fn new(level: u32) -> Self {
        Self::with(&Scratch::default(), usize::MAX, level)
    }

    /// A writer that holds about `budget` bytes of members, the rest in sorted runs in
    /// `scratch`.
    pub fn spilling(scratch: &Scratch, budget: usize) -> Self {
        Self::with(scratch, budget, LEVEL)
    }

    fn with(scratch: &Scratch, budget: usize, level: u32) -> Self {
        Self {
            sorter: Sorter::new(scratch, budget),
            level,
            failed: None,
            count: 0,
            bound: 0,
        }
    }

    /// Appends one member with the fingerprint of what was sent for it (0: unknown).
    pub fn push(&mut self, id: &str, state: MemberState, fingerprint: u32) {
        self.push_tagged(id, state, fingerprint, 0);
    }

    /// Appends one member with a tag (0 to 127) that [`BodyWriter::finish_into`] hands back
    /// with it.
    pub fn push_tagged(&mut self, id: &str, state: MemberState, fingerprint: u32, tag: u8) {
        if self.failed.is_some() {
            return;
        }
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            self.failed = Some(AudienceError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an identifier is empty or longer than 4096 bytes",
            )));
            return;
        }
        if let Err(e) = self
            .sorter
            .push(Entry::new(id, state, fingerprint, tag & 0x7F))
        {
            tracing::error!(error = %e, "the stored audience cannot be sorted through the scratch directory");
            self.failed = Some(e.into());
            return;
        }
        self.count += 1;
        // A member costs at most its head, a varint and its bytes, and a fingerprint.
        self.bound += packed_len(id) + 3 + if fingerprint == 0 { 0 } else { 4 };
    }

    /// Members pushed so far (a user pushed twice counts twice).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// At most about the bytes the body would take if finished now (zlib adds a few bytes
    /// to incompressible ones).
    pub fn len_bound(&self) -> usize {
        self.bound + self.bound / 1000 + 64
    }

    /// The first failure, if pushing failed.
    pub fn failure(&self) -> Option<&AudienceError> {
        self.failed.as_ref()
    }

    /// Writes the sorted body into `out`: each member as `keep` says (its identifier, state,
    /// fingerprint and tag in; the state to write it with out, `None`: left out), one member
    /// per identifier. Answers the output and the members written.
    pub fn finish_into<W: Write>(
        self,
        out: W,
        mut keep: impl FnMut(&str, MemberState, u32, u8) -> Option<MemberState>,
    ) -> Result<(W, u64), AudienceError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut encoder = Encoder::new(out, self.level);
        // The member being gathered: its entry, state and fingerprint so far.
        let mut held: Option<(Entry, Option<MemberState>, u32)> = None;
        for entry in self.sorter.finish()? {
            let entry = entry?;
            let state = keep(entry.id(), entry.state(), entry.fingerprint(), entry.tag());
            let fingerprint = if state.is_some() {
                entry.fingerprint()
            } else {
                0
            };
            match &mut held {
                Some((first, s, fp)) if first.key() == entry.key() => {
                    *s = merged(*s, state);
                    if *fp == 0 {
                        *fp = fingerprint;
                    }
                }
                _ => {
                    if let Some((first, Some(state), fp)) = held.take() {
                        encoder.push(first.id(), state, fp)?;
                    }
                    held = Some((entry, state, fingerprint));
                }
            }
        }
        if let Some((first, Some(state), fp)) = held {
            encoder.push(first.id(), state, fp)?;
        }
        Ok(encoder.finish()?)
    }
}

/// The state of a user written twice: pending wins; left out only when both are.
fn merged(a: Option<MemberState>, b: Option<MemberState>) -> Option<MemberState> {
    match (a, b) {
        (Some(MemberState::Pending), _) | (_, Some(MemberState::Pending)) => {
            Some(MemberState::Pending)
        }
        (Some(s), _) | (None, Some(s)) => Some(s),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::codec::{BodyReader, VERSION};

    fn members(w: BodyWriter) -> Vec<(String, MemberState, u32)> {
        let (body, n) = w.finish_into(Vec::new(), |_, s, _, _| Some(s)).unwrap();
        let mut r = BodyReader::new(&body[..], VERSION);
        let mut got = Vec::new();
        while let Some((id, s, fp)) = r.next_member().unwrap() {
            got.push((id.to_owned(), s, fp));
        }
        assert_eq!(got.len() as u64, n);
        got
    }

    #[test]
    fn members_in_any_order_come_out_sorted_and_once() {
        use MemberState::{Flagged, Pending};
        let dir = tempfile::tempdir().unwrap();
        for budget in [usize::MAX, 200] {
            let mut w = BodyWriter::spilling(&Scratch::new(Some(dir.path().into())), budget);
            w.push("c", Flagged, 0);
            w.push("a", Flagged, 5);
            w.push("b", Pending, 0);
            w.push("a", Pending, 0);
            w.push("b", Flagged, 9);
            for i in (0..100).rev() {
                w.push(&format!("u{i:03}"), Flagged, i);
            }
            assert_eq!(w.count(), 105);
            let got = members(w);
            assert_eq!(got.len(), 103, "budget {budget}");
            assert_eq!(got[0], ("a".into(), Pending, 5));
            assert_eq!(got[1], ("b".into(), Pending, 9));
            assert_eq!(got[2], ("c".into(), Flagged, 0));
            assert_eq!(got[3], ("u000".into(), Flagged, 0));
            assert_eq!(got[102], ("u099".into(), Flagged, 99));
            // The run files are anonymous: nothing is left behind.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn the_keeper_sees_tags_and_leaves_members_out() {
        let mut w = BodyWriter::new(1);
        w.push_tagged("a", MemberState::Flagged, 1, 1);
        w.push_tagged("b", MemberState::Flagged, 2, 2);
        w.push_tagged("b", MemberState::Pending, 3, 1);
        let (body, n) = w
            .finish_into(Vec::new(), |_, s, _, tag| (tag == 2).then_some(s))
            .unwrap();
        assert_eq!(n, 1);
        let mut r = BodyReader::new(&body[..], VERSION);
        assert_eq!(
            r.next_member().unwrap(),
            Some(("b", MemberState::Flagged, 2))
        );
    }

    #[test]
    fn a_scratch_directory_that_fails_is_the_error_of_the_body() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the directory should be: nothing can be created in it.
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "x").unwrap();
        let mut w = BodyWriter::spilling(&Scratch::new(Some(not_a_dir.clone())), 100);
        for i in 0..100 {
            w.push(&format!("user-{i}"), MemberState::Flagged, 0);
        }
        assert!(w.failure().is_some());
        assert!(w.count() < 100);
        let e = w.finish_into(Vec::new(), |_, s, _, _| Some(s)).unwrap_err();
        assert!(matches!(e, AudienceError::Scratch(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("the scratch directory {}", not_a_dir.display())),
            "{msg}"
        );
        assert!(!msg.contains("user-"), "{msg}");
    }

    #[test]
    fn an_identifier_that_cannot_be_stored_is_an_error() {
        let mut w = BodyWriter::new(1);
        w.push("", MemberState::Flagged, 0);
        w.push("a", MemberState::Flagged, 0);
        assert_eq!(w.count(), 0);
        assert!(w.finish_into(Vec::new(), |_, s, _, _| Some(s)).is_err());
    }
}
