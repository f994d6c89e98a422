//! Who this run's Look holds, compared with the stored audience, in compact form: the
//! previous audience as sorted 64-bit keyed hashes (8 bytes a member) with two bits each
//! (seen in the Look at all; taken, that is sent or counted unchanged), and the users new to
//! it in a hash set. It is also the run's deduplication: a million returning users cost 8 MiB
//! and no hash set at all.
//!
//! The hashes are keyed per run (like [`crate::export::mapping::Dedup`]): two identifiers
//! collide with probability n²/2⁶⁴, and a collision never repeats. The low bit of each stored
//! key holds the member's state (set: pending), so keys compare with it cleared.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::io::Read;

use super::codec::AudienceError;
use super::codec::BodyReader;
use super::header::MemberState;

/// What a user's row is, the first time or again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Already taken in this run.
    Duplicate,
    /// Not in the previous audience.
    New,
    /// In the previous audience, at this index; `flagged` when Braze acknowledged its flag.
    Returning {
        /// Its index among the previous members.
        index: usize,
        /// Whether it surely holds the flag.
        flagged: bool,
    },
}

/// The previous audience and this run's users (see the module's header).
#[derive(Debug, Default)]
pub struct Seen {
    keys: RandomState,
    previous: Vec<u64>,
    present: Bits,
    taken: Bits,
    new: HashSet<u64, BuildHasherDefault<Prehashed>>,
}

impl Seen {
    /// No previous audience: plain deduplication.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads the previous audience's members from `body`, as keys (`expected` sizes the
    /// allocation up front).
    pub fn with_previous<R: Read>(
        mut body: BodyReader<R>,
        expected: u64,
    ) -> Result<Self, AudienceError> {
        let mut seen = Self::default();
        let mut previous = Vec::with_capacity(expected.min(1 << 26) as usize);
        while let Some((id, state)) = body.next_member()? {
            previous.push(seen.key(id) | u64::from(state == MemberState::Pending));
        }
        previous.sort_unstable();
        // A repeated key (a collision, or a repeated member) is one member; pending wins.
        previous.dedup_by(|later, kept| {
            let same = *later & !1 == *kept & !1;
            if same {
                *kept |= *later & 1;
            }
            same
        });
        previous.shrink_to_fit();
        seen.present = Bits::new(previous.len());
        seen.taken = Bits::new(previous.len());
        seen.previous = previous;
        Ok(seen)
    }

    /// The run's key for an identifier (its keyed hash, low bit clear).
    pub fn key(&self, id: &str) -> u64 {
        self.keys.hash_one(id) & !1
    }

    /// The index of a previous member, if `key` is one.
    pub fn index(&self, key: u64) -> Option<usize> {
        let i = self.previous.partition_point(|k| k & !1 < key);
        (self.previous.get(i).is_some_and(|k| k & !1 == key)).then_some(i)
    }

    /// A user's row that will be sent (or counted unchanged): duplicates are told apart.
    pub fn offer(&mut self, key: u64) -> Offer {
        match self.index(key) {
            Some(index) => {
                if self.taken.get(index) {
                    return Offer::Duplicate;
                }
                self.taken.set(index);
                self.present.set(index);
                Offer::Returning {
                    index,
                    flagged: self.previous[index] & 1 == 0,
                }
            }
            None if self.new.insert(key) => Offer::New,
            None => Offer::Duplicate,
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
        self.previous.len() as u64
    }

    /// Previous members seen in this run's Look.
    pub fn present_count(&self) -> u64 {
        self.present.count()
    }

    /// Users in this run's Look who were not in the previous audience (and were offered).
    pub fn new_count(&self) -> u64 {
        self.new.len() as u64
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
        self.previous[i] & 1 == 0
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

/// A fixed set of bits.
#[derive(Debug, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    fn set(&mut self, i: usize) {
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
    use crate::audience::codec::BodyWriter;

    fn previous(members: &[(&str, MemberState)]) -> Seen {
        let mut w = BodyWriter::new(1);
        for (id, s) in members {
            w.push(id, *s);
        }
        let (body, n) = w.finish();
        Seen::with_previous(BodyReader::new(&body[..]), n).unwrap()
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
                flagged: true
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
    fn key_sets_find_their_keys() {
        let set = KeySet::new(vec![9, 3, 3, 7]);
        assert_eq!(set.len(), 3);
        assert!(set.contains(7) && !set.contains(8));
    }
}
