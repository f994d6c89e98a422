//! The members of a stored audience (and of its pending records) in identifier order, each
//! once: what a run too large to hold the previous audience in memory merges its sorted rows
//! with. The members go through the scratch directory ([`crate::spill`]); a user who comes
//! more than once is pending if any of its entries is, with the first known fingerprint.

use super::codec::AudienceError;
use super::encoded::{Encoded, Members};
use super::header::MemberState;
use crate::spill::{Record, Scratch, Sorted, Sorter, SpillError};

/// One entry of a member, as it goes through the scratch directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: String,
    state: MemberState,
    fingerprint: u32,
}

impl Record for Entry {
    fn key(&self) -> &[u8] {
        self.id.as_bytes()
    }
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.state as u8);
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.extend_from_slice(self.id.as_bytes());
    }
    fn read(bytes: &[u8]) -> Option<Self> {
        let (&state, rest) = bytes.split_first()?;
        let (fp, id) = rest.split_at_checked(4)?;
        Some(Self {
            id: std::str::from_utf8(id).ok()?.to_owned(),
            state: match state {
                0 => MemberState::Flagged,
                1 => MemberState::Pending,
                _ => return None,
            },
            fingerprint: u32::from_le_bytes(fp.try_into().ok()?),
        })
    }
    fn heap_bytes(&self) -> usize {
        self.id.capacity()
    }
}

/// Bytes of members held before a sorted run is written.
const RUN_BYTES: usize = 8 << 20;

/// The members of `encoded`, in identifier order, each once (an iterator of identifier,
/// state and fingerprint).
pub struct Merged<'a> {
    /// Already in order (a body of version 3 alone): read as it is.
    sorted: Option<Members<'a>>,
    entries: Option<Sorted<Entry>>,
    next: Option<Entry>,
}

impl<'a> Merged<'a> {
    /// The members of `encoded`: read as they are when already in order
    /// ([`Encoded::is_sorted`]), else sorted through the scratch directory (body and pending
    /// records).
    pub fn of(encoded: &'a Encoded, scratch: &Scratch) -> Result<Self, AudienceError> {
        if encoded.is_sorted() {
            return Ok(Self {
                sorted: Some(encoded.members()?),
                entries: None,
                next: None,
            });
        }
        let mut sorter = Sorter::new(scratch, RUN_BYTES);
        let mut members = encoded.members()?;
        while let Some((id, state, fingerprint)) = members.next_member()? {
            sorter
                .push(Entry {
                    id: id.to_owned(),
                    state,
                    fingerprint,
                })
                .map_err(scratch_error)?;
        }
        let mut entries = sorter.finish().map_err(scratch_error)?;
        let next = entries.next().transpose().map_err(scratch_error)?;
        Ok(Self {
            sorted: None,
            entries: Some(entries),
            next,
        })
    }

    /// The next member: identifier, state (pending if any entry is) and fingerprint (the
    /// first known).
    pub fn next_member(&mut self) -> Result<Option<(String, MemberState, u32)>, AudienceError> {
        if let Some(members) = &mut self.sorted {
            return Ok(members
                .next_member()?
                .map(|(id, state, fp)| (id.to_owned(), state, fp)));
        }
        let (Some(mut member), Some(entries)) = (self.next.take(), &mut self.entries) else {
            return Ok(None);
        };
        while let Some(entry) = entries.next().transpose().map_err(scratch_error)? {
            if entry.id != member.id {
                self.next = Some(entry);
                break;
            }
            if entry.state == MemberState::Pending {
                member.state = MemberState::Pending;
            }
            if member.fingerprint == 0 {
                member.fingerprint = entry.fingerprint;
            }
        }
        Ok(Some((member.id, member.state, member.fingerprint)))
    }
}

fn scratch_error(e: SpillError) -> AudienceError {
    AudienceError::Scratch(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::Header;
    use crate::audience::writer::BodyWriter;

    fn encoded(members: &[(&str, MemberState, u32)], flag: &str) -> Encoded {
        let mut w = BodyWriter::new(1);
        for (id, s, fp) in members {
            w.push(id, *s, *fp);
        }
        Encoded::new(Header::example(flag), w)
    }

    #[test]
    fn members_come_sorted_once_each_pending_winning() {
        use MemberState::{Flagged, Pending};
        let body = encoded(
            &[("c", Flagged, 3), ("a", Flagged, 0), ("b", Pending, 2)],
            "F",
        );
        let record = encoded(&[("a", Flagged, 9), ("d", Flagged, 4)], "F");
        let all = Encoded::with_pending(Some(body), vec![record])
            .unwrap()
            .unwrap();
        let mut m = Merged::of(&all, &Scratch::default()).unwrap();
        let mut got = Vec::new();
        while let Some(member) = m.next_member().unwrap() {
            got.push(member);
        }
        let want = [
            // In a pending record too: pending; the body's fingerprint is unknown, the
            // record's unknown as well (records carry none).
            ("a", Pending, 0),
            ("b", Pending, 2),
            ("c", Flagged, 3),
            ("d", Pending, 0),
        ];
        let want: Vec<(String, MemberState, u32)> = want
            .iter()
            .map(|(id, s, fp)| ((*id).to_owned(), *s, *fp))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_body_already_in_order_is_read_as_it_is() {
        use MemberState::{Flagged, Pending};
        let body = encoded(&[("b", Pending, 2), ("a", Flagged, 1)], "F");
        assert!(body.is_sorted());
        let mut m = Merged::of(&body, &Scratch::new(Some("/nonexistent".into()))).unwrap();
        assert!(
            m.sorted.is_some(),
            "no sort: the scratch directory is not used"
        );
        assert_eq!(m.next_member().unwrap(), Some(("a".into(), Flagged, 1)));
        assert_eq!(m.next_member().unwrap(), Some(("b".into(), Pending, 2)));
        assert_eq!(m.next_member().unwrap(), None);
    }
}
