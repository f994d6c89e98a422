//! Who this run's Look holds, compared with the stored audience, in compact form: the
//! previous audience as sorted 64-bit keyed hashes, each with the 32-bit fingerprint of what
//! was last sent (12 bytes a member) and two bits (seen in the Look at all; taken, that is
//! sent or counted unchanged), and the users new to it in a hash set. It is also the run's
//! deduplication: a million returning users cost 12 MiB and no hash set at all.
//!
//! The hashes are keyed per run: two identifiers collide with probability n²/2⁶⁴, and a
//! collision never repeats. The low bit of each stored key holds the member's state (set:
//! pending), so keys compare with it cleared. Past [`NEW_IN_MEMORY`] new users, or a previous
//! audience past the run's limit ([`Seen::sorted`]), rows wait in the scratch directory
//! instead ([`crate::export::deferred`]).

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use super::codec::AudienceError;
use super::encoded::{Encoded, Members};
use super::header::MemberState;
use super::merged::Merged;
use crate::spill::Scratch;

/// What a user's row is, the first time or again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Already taken in this run.
    Duplicate,
    /// Not in the previous audience.
    New,
    /// Not in the previous audience, nor among the users new to it held in memory, which
    /// are as many as may be: deduplicated later, in identifier order (see
    /// [`crate::export::deferred`]).
    Deferred,
    /// In the previous audience, at this index; `flagged` when Braze acknowledged its flag.
    Returning {
        /// Its index among the previous members.
        index: usize,
        /// Whether it surely holds the flag.
        flagged: bool,
        /// The fingerprint of what was last sent for it (0: unknown).
        fingerprint: u32,
    },
}

/// A previous member: its key (low bit: pending) and fingerprint, packed in 12 bytes.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed(4))]
struct Entry {
    key: u64,
    fingerprint: u32,
}

/// The previous audience and this run's users (see the module's header).
#[derive(Debug)]
pub struct Seen {
    keys: RandomState,
    previous: Vec<Entry>,
    present: Bits,
    taken: Bits,
    new: HashSet<u64, BuildHasherDefault<Prehashed>>,
    /// Most users new to the audience held in `new`.
    new_cap: usize,
    /// Users new to the audience deduplicated later ([`Offer::Deferred`]), once each.
    deferred_new: u64,
    /// The previous audience is too large to hold: its members are not in `previous` but
    /// merged, in identifier order, with the run's rows (see [`Seen::sorted`]).
    sorted: Option<u64>,
}

/// Users new to the audience held in memory by default: as many as a table of 2²⁰ slots
/// takes without growing (9 MiB): past them, a run's new users go through the scratch
/// directory, so memory does not grow with the Look.
pub const NEW_IN_MEMORY: usize = (1 << 20) / 8 * 7;

impl Default for Seen {
    fn default() -> Self {
        Self {
            keys: RandomState::new(),
            previous: Vec::new(),
            present: Bits::default(),
            taken: Bits::default(),
            new: HashSet::default(),
            new_cap: NEW_IN_MEMORY,
            deferred_new: 0,
            sorted: None,
        }
    }
}

impl Seen {
    /// No previous audience: plain deduplication.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads the previous audience's members, as keys (`expected` sizes the allocation up
    /// front).
    pub fn with_previous(mut members: Members<'_>, expected: u64) -> Result<Self, AudienceError> {
        let mut seen = Self::default();
        let mut previous = Vec::with_capacity(expected.min(1 << 26) as usize);
        while let Some((id, state, fingerprint)) = members.next_member()? {
            previous.push(Entry {
                key: seen.key(id) | u64::from(state == MemberState::Pending),
                fingerprint,
            });
        }
        previous.sort_unstable_by_key(|e| e.key);
        // A repeated key (a collision, or a member also in a pending record) is one member;
        // pending wins, and a known fingerprint.
        previous.dedup_by(|later, kept| {
            let same = later.key & !1 == kept.key & !1;
            if same {
                kept.key |= later.key & 1;
                if kept.fingerprint == 0 {
                    kept.fingerprint = later.fingerprint;
                }
            }
            same
        });
        previous.shrink_to_fit();
        seen.present = Bits::new(previous.len());
        seen.taken = Bits::new(previous.len());
        seen.previous = previous;
        Ok(seen)
    }

    /// A previous audience of at most `members` members, too large to hold: every row is
    /// [`Offer::Deferred`], and the members are told apart by their place in identifier
    /// order ([`Previous`]), once the rows were merged with them.
    pub fn sorted(members: u64) -> Self {
        Self {
            present: Bits::new(members as usize),
            taken: Bits::new(members as usize),
            sorted: Some(0),
            ..Self::default()
        }
    }

    /// Whether the previous members are merged in identifier order ([`Seen::sorted`]).
    pub fn is_sorted(&self) -> bool {
        self.sorted.is_some()
    }

    /// After the merge: previous member `i` (in identifier order) was in the Look; `taken`
    /// when its row was sent or counted unchanged.
    pub fn merged_present(&mut self, i: usize, taken: bool) {
        self.present.set(i);
        if taken {
            self.taken.set(i);
        }
    }

    /// After the merge: how many members the previous audience has.
    pub fn merged_len(&mut self, members: u64) {
        self.sorted = Some(members);
    }

    /// Holds at most `cap` users new to the audience in memory (see [`NEW_IN_MEMORY`]).
    pub fn with_new_cap(mut self, cap: usize) -> Self {
        self.new_cap = cap;
        self
    }

    /// One more user new to the audience, deduplicated after an [`Offer::Deferred`].
    pub fn note_deferred_new(&mut self) {
        self.deferred_new += 1;
    }

    /// The run's key for an identifier (its keyed hash, low bit clear).
    pub fn key(&self, id: &str) -> u64 {
        self.keys.hash_one(id) & !1
    }

    /// The index of a previous member, if `key` is one.
    pub fn index(&self, key: u64) -> Option<usize> {
        let i = self.previous.partition_point(|e| e.key & !1 < key);
        (self.previous.get(i).is_some_and(|e| e.key & !1 == key)).then_some(i)
    }

    /// A user's row that will be sent (or counted unchanged): duplicates are told apart.
    pub fn offer(&mut self, key: u64) -> Offer {
        if self.is_sorted() {
            return Offer::Deferred;
        }
        match self.index(key) {
            Some(index) => {
                if self.taken.get(index) {
                    return Offer::Duplicate;
                }
                self.taken.set(index);
                self.present.set(index);
                let Entry { key, fingerprint } = self.previous[index];
                Offer::Returning {
                    index,
                    flagged: key & 1 == 0,
                    fingerprint,
                }
            }
            None if self.new.contains(&key) => Offer::Duplicate,
            None if self.new.len() >= self.new_cap => Offer::Deferred,
            None => {
                self.new.insert(key);
                Offer::New
            }
        }
    }

    /// A user in the Look whose row is not sent (invalid for another reason than its
    /// identifier, or beyond `maxRows`): a previous member is still there, not one to remove.
    pub fn mark_present(&mut self, key: u64) {
        if let Some(i) = self.index(key) {
            self.present.set(i);
        }
    }

    /// Members of the previous audience.
    pub fn previous_len(&self) -> u64 {
        self.sorted.unwrap_or(self.previous.len() as u64)
    }

    /// Previous members seen in this run's Look.
    pub fn present_count(&self) -> u64 {
        self.present.count()
    }

    /// Previous members sent (or counted unchanged) in this run.
    pub fn taken_count(&self) -> u64 {
        self.taken.count()
    }

    /// Users in this run's Look who were not in the previous audience (and were offered).
    pub fn new_count(&self) -> u64 {
        self.new.len() as u64 + self.deferred_new
    }

    /// Whether previous member `i` was in this run's Look.
    pub fn is_present(&self, i: usize) -> bool {
        self.present.get(i)
    }

    /// Whether previous member `i` was sent (or counted unchanged) in this run.
    pub fn is_taken(&self, i: usize) -> bool {
        self.taken.get(i)
    }

    /// Whether previous member `i` surely held the flag.
    pub fn is_flagged(&self, i: usize) -> bool {
        self.previous[i].key & 1 == 0
    }

    /// The fingerprint of what was last sent for previous member `i` (0: unknown).
    pub fn fingerprint(&self, i: usize) -> u32 {
        self.previous[i].fingerprint
    }

    /// The state previous member `i` had.
    pub fn previous_state(&self, i: usize) -> MemberState {
        if self.is_flagged(i) {
            MemberState::Flagged
        } else {
            MemberState::Pending
        }
    }
}

/// The previous members, each once, with their index in a [`Seen`]: in memory, by their
/// key; merged, by their place in identifier order.
pub enum Previous<'a> {
    /// The body and pending records as stored; a member that comes again is skipped.
    Memory {
        /// The members.
        members: Members<'a>,
        /// Members already given.
        visited: Bits,
    },
    /// In identifier order, each once.
    Merged {
        /// The members.
        members: Merged<'a>,
        /// The index of the next one.
        next: usize,
    },
}

impl<'a> Previous<'a> {
    /// The members of `encoded` as `seen` tells them apart.
    pub fn of(encoded: &'a Encoded, seen: &Seen, scratch: &Scratch) -> Result<Self, AudienceError> {
        Ok(if seen.is_sorted() {
            Previous::Merged {
                members: Merged::of(encoded, scratch)?,
                next: 0,
            }
        } else {
            Previous::Memory {
                members: encoded.members()?,
                visited: Bits::new(seen.previous.len()),
            }
        })
    }

    /// The next member: its index, identifier, state and fingerprint (pending if any of its
    /// entries is; the first known fingerprint).
    pub fn next_member(
        &mut self,
        seen: &Seen,
    ) -> Result<Option<(usize, String, MemberState, u32)>, AudienceError> {
        match self {
            Previous::Memory { members, visited } => {
                while let Some((id, _, _)) = members.next_member()? {
                    let Some(i) = seen.index(seen.key(id)).filter(|i| !visited.get(*i)) else {
                        continue;
                    };
                    visited.set(i);
                    let state = seen.previous_state(i);
                    return Ok(Some((i, id.to_owned(), state, seen.fingerprint(i))));
                }
                Ok(None)
            }
            Previous::Merged { members, next } => {
                let Some((id, state, fp)) = members.next_member()? else {
                    return Ok(None);
                };
                *next += 1;
                Ok(Some((*next - 1, id, state, fp)))
            }
        }
    }
}

/// A fixed set of bits.
#[derive(Debug, Default)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// `n` bits, all clear.
    pub fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    /// Sets bit `i`.
    pub fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A set of keys built once, then looked up (the keys of failed or rejected objects).
#[derive(Clone, Debug, Default)]
pub struct KeySet(Vec<u64>);

impl KeySet {
    /// Sorts the keys.
    pub fn new(mut keys: Vec<u64>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        Self(keys)
    }

    /// Whether `key` is in the set.
    pub fn contains(&self, key: u64) -> bool {
        self.0.binary_search(&key).is_ok()
    }

    /// Keys in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys, sorted.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }
}

/// Hasher for keys that are already hashes.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::writer::BodyWriter;
    use crate::audience::{Encoded, Header};

    fn encoded(members: &[(&str, MemberState)], flag: &str) -> Encoded {
        let mut w = BodyWriter::new(1);
        for (i, (id, s)) in members.iter().enumerate() {
            w.push(id, *s, 100 + i as u32);
        }
        Encoded::new(Header::example(flag), w)
    }

    fn previous(members: &[(&str, MemberState)]) -> Seen {
        let e = encoded(members, "F");
        Seen::with_previous(e.members().unwrap(), e.header().members).unwrap()
    }

    #[test]
    fn without_a_previous_audience_it_deduplicates() {
        let mut s = Seen::new();
        let (a, b) = (s.key("u1"), s.key("u2"));
        assert_eq!(s.offer(a), Offer::New);
        assert_eq!(s.offer(b), Offer::New);
        assert_eq!(s.offer(a), Offer::Duplicate);
        assert_eq!(
            (s.previous_len(), s.present_count(), s.new_count()),
            (0, 0, 2)
        );
    }

    #[test]
    fn past_the_cap_new_users_are_deferred_and_known_ones_still_told() {
        let mut s = previous(&[("a", MemberState::Flagged)]).with_new_cap(2);
        let k: Vec<u64> = ["a", "x", "y", "z"].iter().map(|id| s.key(id)).collect();
        assert_eq!(s.offer(k[1]), Offer::New);
        assert_eq!(s.offer(k[2]), Offer::New);
        assert_eq!(s.offer(k[3]), Offer::Deferred);
        assert_eq!(
            s.offer(k[3]),
            Offer::Deferred,
            "deferred users are not held"
        );
        assert_eq!(s.offer(k[1]), Offer::Duplicate);
        assert!(matches!(s.offer(k[0]), Offer::Returning { .. }));
        assert_eq!(s.offer(k[0]), Offer::Duplicate);
        s.note_deferred_new();
        assert_eq!(s.new_count(), 3);
    }

    #[test]
    fn returning_new_present_and_absent_members() {
        use MemberState::{Flagged, Pending};
        let mut s = previous(&[
            ("a", Flagged),
            ("b", Pending),
            ("c", Flagged),
            ("d", Flagged),
        ]);
        assert_eq!(s.previous_len(), 4);
        let k = |s: &Seen, id| s.key(id);
        let (a, b, c, x) = (k(&s, "a"), k(&s, "b"), k(&s, "c"), k(&s, "x"));
        assert!(matches!(s.offer(a), Offer::Returning { flagged: true, .. }));
        assert!(matches!(
            s.offer(b),
            Offer::Returning { flagged: false, .. }
        ));
        assert_eq!(s.offer(a), Offer::Duplicate);
        assert_eq!(s.offer(x), Offer::New);
        assert_eq!(s.offer(x), Offer::Duplicate);
        s.mark_present(c);
        s.mark_present(x);
        assert_eq!((s.present_count(), s.new_count()), (3, 1));
        let ci = s.index(c).unwrap();
        assert!(s.is_present(ci) && !s.is_taken(ci) && s.is_flagged(ci));
        let di = s.index(k(&s, "d")).unwrap();
        assert!(!s.is_present(di));
        assert_eq!(s.previous_state(s.index(b).unwrap()), Pending);
        assert_eq!(
            s.offer(c),
            Offer::Returning {
                index: ci,
                flagged: true,
                fingerprint: 102
            }
        );
    }

    #[test]
    fn repeated_members_are_one_and_pending_wins() {
        let s = previous(&[("a", MemberState::Flagged), ("a", MemberState::Pending)]);
        assert_eq!(s.previous_len(), 1);
        assert!(!s.is_flagged(0));
    }

    #[test]
    fn pending_records_add_their_users_as_pending() {
        use MemberState::Flagged;
        let main = encoded(&[("a", Flagged), ("b", Flagged)], "F");
        let stopped = encoded(&[("b", Flagged), ("c", Flagged)], "G");
        let merged = Encoded::with_pending(Some(main), vec![stopped])
            .unwrap()
            .unwrap();
        assert_eq!(merged.header().stray_flags.len(), 1);
        assert_eq!(merged.header().stray_flags[0].export_name, "G");
        assert_eq!((merged.pending_len(), merged.pending_members()), (1, 2));
        let mut s = Seen::with_previous(merged.members().unwrap(), 4).unwrap();
        assert_eq!(s.previous_len(), 3);
        let (a, b, c) = (s.key("a"), s.key("b"), s.key("c"));
        assert_eq!(
            s.offer(a),
            Offer::Returning {
                index: s.index(a).unwrap(),
                flagged: true,
                fingerprint: 100
            }
        );
        // In both: pending wins, and the body's fingerprint is kept.
        let bi = s.index(b).unwrap();
        assert!(!s.is_flagged(bi));
        assert_eq!(s.fingerprint(bi), 101);
        let ci = s.index(c).unwrap();
        assert!(!s.is_flagged(ci));
        assert_eq!(s.fingerprint(ci), 0);
    }

    #[test]
    fn pending_records_alone_make_an_audience_and_others_are_refused() {
        let stopped = encoded(&[("c", MemberState::Flagged)], "F");
        let alone = Encoded::with_pending(None, vec![stopped.clone()])
            .unwrap()
            .unwrap();
        assert_eq!(alone.header().members, 0);
        assert!(alone.header().stray_flags.is_empty());
        assert_eq!(alone.pending_members(), 1);
        assert!(Encoded::with_pending(None, Vec::new()).unwrap().is_none());
        let mut other = encoded(&[], "F");
        let mut h = other.header().clone();
        h.export.name = "other".into();
        other = Encoded::new(h, BodyWriter::new(1));
        let err = Encoded::with_pending(Some(other), vec![stopped]).unwrap_err();
        assert_eq!(
            err,
            "a pending record of e does not match the audience of other"
        );
    }

    #[test]
    fn key_sets_find_their_keys() {
        let set = KeySet::new(vec![9, 3, 3, 7]);
        assert_eq!(set.len(), 3);
        assert!(set.contains(7) && !set.contains(8));
    }
}
