//! Rows that wait for the end of the Look: once the users new to the audience held in
//! memory are as many as may be ([`crate::audience::seen::NEW_IN_MEMORY`]), each row of
//! another new user is mapped and serialized, then sorted by identifier through the scratch
//! directory ([`crate::spill`]). After the Look, they come back in identifier order, the
//! rows of one user together in the order they were read: the first is sent, the others are
//! duplicates. So a run deduplicates exactly, and holds no more than its budget, whatever
//! the number of users.

use crate::spill::{Record, Scratch, Sorter, SpillError};

/// A mapped row waiting for the end of the Look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingRow {
    /// The identifier, as sent.
    pub id: String,
    /// The row's number in the Look.
    pub number: u64,
    /// The fingerprint of the object (0: not taken).
    pub fingerprint: u32,
    /// Attributes cut to Braze's limit (noted when the row is sent).
    pub too_long: Vec<String>,
    /// The object, serialized as it is sent; empty for a row only telling that its user is
    /// in the Look (`present`).
    pub object: Vec<u8>,
    /// The row is not sent (invalid for another reason than its identifier, or past
    /// `maxRows`), and only tells that a previous member is still in the Look.
    pub present: bool,
}

impl WaitingRow {
    /// A row telling only that user `id` is in the Look.
    pub fn present(id: String, number: u64) -> Self {
        Self {
            id,
            number,
            fingerprint: 0,
            too_long: Vec::new(),
            object: Vec::new(),
            present: true,
        }
    }
}

impl Record for WaitingRow {
    fn key(&self) -> &[u8] {
        self.id.as_bytes()
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.present));
        put_varint(out, self.number);
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        put_bytes(out, self.id.as_bytes());
        put_varint(out, self.too_long.len() as u64);
        for name in &self.too_long {
            put_bytes(out, name.as_bytes());
        }
        out.extend_from_slice(&self.object);
    }

    fn read(mut bytes: &[u8]) -> Option<Self> {
        let b = &mut bytes;
        let (&present, rest) = b.split_first()?;
        *b = rest;
        let number = take_varint(b)?;
        let (fp, rest) = b.split_at_checked(4)?;
        *b = rest;
        let fingerprint = u32::from_le_bytes(fp.try_into().ok()?);
        let id = String::from_utf8(take_bytes(b)?.to_vec()).ok()?;
        let names = take_varint(b)?;
        let mut too_long = Vec::new();
        for _ in 0..names {
            too_long.push(String::from_utf8(take_bytes(b)?.to_vec()).ok()?);
        }
        Some(Self {
            id,
            number,
            fingerprint,
            too_long,
            object: b.to_vec(),
            present: match present {
                0 => false,
                1 => true,
                _ => return None,
            },
        })
    }

    fn heap_bytes(&self) -> usize {
        self.id.capacity()
            + self.object.capacity()
            + self
                .too_long
                .iter()
                .map(|n| n.capacity() + 24)
                .sum::<usize>()
    }
}

/// The rows waiting, and the rows taken back so far.
#[derive(Debug)]
pub struct Waiting {
    sorter: Sorter<WaitingRow>,
    /// Of them, rows that only tell their user is in the Look (counted when read).
    present: u64,
}

impl Waiting {
    /// Rows sorted through `scratch`, `run_bytes` of them held at a time.
    pub fn new(scratch: &Scratch, run_bytes: usize) -> Self {
        Self {
            sorter: Sorter::new(scratch, run_bytes),
            present: 0,
        }
    }

    /// Sets a row aside.
    pub fn push(&mut self, row: WaitingRow) -> Result<(), SpillError> {
        self.present += u64::from(row.present);
        self.sorter.push(row)
    }

    /// Rows set aside that are still to be counted: all but the [`WaitingRow::present`]
    /// ones, which were counted (invalid or skipped) when they were read.
    pub fn to_count(&self) -> u64 {
        self.sorter.len() - self.present
    }

    /// Rows set aside.
    pub fn len(&self) -> u64 {
        self.sorter.len()
    }

    /// True when none was.
    pub fn is_empty(&self) -> bool {
        self.sorter.is_empty()
    }

    /// The rows in identifier order, each told first of its user or a duplicate.
    pub fn finish(self) -> Result<Users, SpillError> {
        Ok(Users {
            rows: self.sorter.finish()?,
            last: None,
        })
    }
}

/// The rows set aside, in identifier order (an iterator).
pub struct Users {
    rows: crate::spill::Sorted<WaitingRow>,
    last: Option<String>,
}

/// A row taken back: the first of its user, a duplicate, or one that only tells its user
/// is in the Look.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// The first row of a user: to send.
    First(WaitingRow),
    /// A later row of the same user, by its number.
    Duplicate(u64),
    /// A row not sent ([`WaitingRow::present`]).
    Present(WaitingRow),
}

impl Taken {
    /// The identifier of a first or present row.
    pub fn id(&self) -> Option<&str> {
        match self {
            Taken::First(r) | Taken::Present(r) => Some(&r.id),
            Taken::Duplicate(_) => None,
        }
    }
}

impl Iterator for Users {
    type Item = Result<Taken, SpillError>;

    fn next(&mut self) -> Option<Self::Item> {
        let row = match self.rows.next()? {
            Ok(row) => row,
            Err(e) => return Some(Err(e)),
        };
        if row.present {
            return Some(Ok(Taken::Present(row)));
        }
        if self.last.as_deref() == Some(row.id.as_str()) {
            return Some(Ok(Taken::Duplicate(row.number)));
        }
        self.last = Some(row.id.clone());
        Some(Ok(Taken::First(row)))
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn take_varint(b: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        value |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn take_bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_varint(b)?).ok()?;
    let (bytes, rest) = b.split_at_checked(len)?;
    *b = rest;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, number: u64) -> WaitingRow {
        WaitingRow {
            id: id.into(),
            number,
            fingerprint: number as u32 * 7,
            too_long: if number.is_multiple_of(2) {
                vec!["city".into()]
            } else {
                Vec::new()
            },
            object: format!("{{\"external_id\":\"{id}\",\"n\":{number}}}").into_bytes(),
            present: false,
        }
    }

    #[test]
    fn rows_round_trip_through_their_bytes() {
        for r in [
            row("u1", 1),
            row("é", 2),
            row("", 300),
            WaitingRow::present("p".into(), 4),
        ] {
            let mut bytes = Vec::new();
            r.write(&mut bytes);
            assert_eq!(WaitingRow::read(&bytes), Some(r.clone()));
            for cut in 0..bytes.len().min(12) {
                // Cut in the head: never a panic, and never a row that was not written.
                assert_ne!(WaitingRow::read(&bytes[..cut]), Some(r.clone()));
            }
        }
    }

    #[test]
    fn the_first_row_of_each_user_is_taken_the_others_are_duplicates() {
        let scratch = Scratch::default();
        // 64 bytes a run: every row or two is written to a file.
        let mut w = Waiting::new(&scratch, 64);
        w.push(WaitingRow::present("c".into(), 0)).unwrap();
        let ids = ["c", "a", "b", "a", "c", "c", "d"];
        for (i, id) in ids.iter().enumerate() {
            w.push(row(id, i as u64 + 1)).unwrap();
        }
        w.push(WaitingRow::present("a".into(), 8)).unwrap();
        assert_eq!(w.len(), 9);
        let got: Vec<Taken> = w.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(
            got,
            [
                Taken::First(row("a", 2)),
                Taken::Duplicate(4),
                Taken::Present(WaitingRow::present("a".into(), 8)),
                Taken::First(row("b", 3)),
                Taken::Present(WaitingRow::present("c".into(), 0)),
                Taken::First(row("c", 1)),
                Taken::Duplicate(5),
                Taken::Duplicate(6),
                Taken::First(row("d", 7)),
            ]
        );
    }
}
