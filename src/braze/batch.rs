//! One `/users/track` request's worth of attributes objects, kept serialized, with the row
//! number each came from and a key per object (the user's keyed hash, so that a run with a
//! stored audience knows whose objects failed without keeping identifiers).

use serde::Serialize;

/// Largest request body the pipeline builds, in bytes. Braze accepts up to 4 MB; a smaller
/// budget keeps memory low with hundreds of requests in flight, and is still far above a
/// batch of 75 ordinary objects (about 10 KB).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Serialized attributes objects and their rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    rows: Vec<u64>,
    keys: Vec<u64>,
}

impl Batch {
    /// An empty batch with room for `n` objects.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(n * 128),
            ends: Vec::with_capacity(n),
            rows: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
        }
    }

    /// Appends an object that came from row `row`.
    pub fn push<T: Serialize>(&mut self, row: u64, object: &T) -> serde_json::Result<()> {
        self.push_keyed(row, 0, object)
    }

    /// Appends an object that came from row `row`, for the user with key `key`.
    pub fn push_keyed<T: Serialize>(
        &mut self,
        row: u64,
        key: u64,
        object: &T,
    ) -> serde_json::Result<()> {
        let start = self.bytes.len();
        if let Err(e) = serde_json::to_writer(&mut self.bytes, object) {
            self.bytes.truncate(start);
            return Err(e);
        }
        self.ends.push(self.bytes.len());
        self.rows.push(row);
        self.keys.push(key);
        Ok(())
    }

    /// Appends an object already serialized (`json`: one JSON object).
    pub fn push_bytes(&mut self, row: u64, key: u64, json: &[u8]) {
        self.bytes.extend_from_slice(json);
        self.ends.push(self.bytes.len());
        self.rows.push(row);
        self.keys.push(key);
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when the batch holds no object.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Size of [`Batch::body`] in bytes, without building it.
    pub fn body_len(&self) -> usize {
        self.bytes.len() + self.len().saturating_sub(1) + br#"{"attributes":[]}"#.len()
    }

    /// Takes the last object out into a batch of its own.
    pub fn pop_last(&mut self) -> Batch {
        let n = self.len();
        if n == 0 {
            return Batch::default();
        }
        let start = if n == 1 { 0 } else { self.ends[n - 2] };
        let mut last = Batch::with_capacity(1);
        last.bytes.extend_from_slice(&self.bytes[start..]);
        last.ends.push(last.bytes.len());
        last.rows.push(self.rows[n - 1]);
        last.keys.push(self.keys[n - 1]);
        self.bytes.truncate(start);
        self.ends.pop();
        self.rows.pop();
        self.keys.pop();
        last
    }

    /// Row number of each object, in order.
    pub fn rows(&self) -> &[u64] {
        &self.rows
    }

    /// Key of each object, in order (0 when pushed without one).
    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    fn object(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// The request body: `{"attributes":[…]}`.
    pub fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.bytes.len() + self.len() + 20);
        body.extend_from_slice(b"{\"attributes\":[");
        for i in 0..self.len() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(self.object(i));
        }
        body.extend_from_slice(b"]}");
        body
    }

    /// The objects whose index passes `keep`, in order.
    pub fn select(&self, keep: impl Fn(usize) -> bool) -> Batch {
        let mut out = Batch::with_capacity(self.len());
        for i in (0..self.len()).filter(|&i| keep(i)) {
            out.bytes.extend_from_slice(self.object(i));
            out.ends.push(out.bytes.len());
            out.rows.push(self.rows[i]);
            out.keys.push(self.keys[i]);
        }
        out
    }

    /// Splits into two halves (for a 413 answer); the first gets the extra object.
    pub fn split(&self) -> (Batch, Batch) {
        let mid = self.len().div_ceil(2);
        (self.select(|i| i < mid), self.select(|i| i >= mid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn batch(n: u64) -> Batch {
        let mut b = Batch::with_capacity(n as usize);
        for i in 0..n {
            b.push(i + 10, &json!({"external_id": format!("u{i}")}))
                .unwrap();
        }
        b
    }

    fn ids(b: &Batch) -> Vec<String> {
        let v: Value = serde_json::from_slice(&b.body()).unwrap();
        v["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["external_id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn body_is_the_track_shape() {
        assert_eq!(
            String::from_utf8(batch(2).body()).unwrap(),
            r#"{"attributes":[{"external_id":"u0"},{"external_id":"u1"}]}"#
        );
        assert_eq!(
            String::from_utf8(Batch::default().body()).unwrap(),
            r#"{"attributes":[]}"#
        );
    }

    #[test]
    fn split_and_select_keep_rows_with_objects() {
        let b = batch(5);
        let (l, r) = b.split();
        assert_eq!(ids(&l), ["u0", "u1", "u2"]);
        assert_eq!(r.rows(), [13, 14]);
        let odd = b.select(|i| i % 2 == 1);
        assert_eq!(
            (ids(&odd), odd.rows().to_vec()),
            (vec!["u1".to_string(), "u3".into()], vec![11, 13])
        );
        let (one, none) = batch(1).split();
        assert_eq!((one.len(), none.len()), (1, 0));
    }

    #[test]
    fn body_len_and_pop_last() {
        for n in 0..4 {
            let b = batch(n);
            assert_eq!(b.body_len(), b.body().len(), "{n}");
        }
        let mut b = batch(3);
        let last = b.pop_last();
        assert_eq!(
            (ids(&b), ids(&last)),
            (vec!["u0".to_string(), "u1".into()], vec!["u2".to_string()])
        );
        assert_eq!(last.rows(), [12]);
        assert_eq!(last.keys(), [0]);
        assert_eq!(b.body_len(), b.body().len());
        let mut one = batch(1);
        assert_eq!(one.pop_last().rows(), [10]);
        assert!(one.is_empty() && one.pop_last().is_empty());
    }

    #[test]
    fn keys_follow_their_objects() {
        let mut b = Batch::with_capacity(4);
        for i in 0..4u64 {
            b.push_keyed(i + 1, 100 + i, &json!({"external_id": format!("u{i}")}))
                .unwrap();
        }
        let (l, r) = b.split();
        assert_eq!((l.keys(), r.keys()), (&[100, 101][..], &[102, 103][..]));
        assert_eq!(b.select(|i| i == 3).keys(), [103]);
        assert_eq!(b.pop_last().keys(), [103]);
        assert_eq!(b.keys(), [100, 101, 102]);
    }
}
