//! Streaming parser for Looker's `json_detail` result format.
//!
//! The body is one JSON object; `fields` comes before `data`. The parser walks it with
//! serde, hands the field list to a [`RowSink`] (which answers with the fields it needs),
//! then hands over each row with only those cells kept, and forgets the row. Memory does not
//! grow with the number of rows.

use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::cap;
use super::client::MAX_MESSAGE_CHARS;
use crate::text::{clean, name_list};

/// One field of the result: its name (`view.field`) and LookML tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Fully qualified name, the key of its cells in every row.
    pub name: String,
    /// LookML tags (non-string tags are dropped).
    pub tags: Vec<String>,
}

/// The result's fields in Looker's order: dimensions, measures, filters, parameters,
/// table calculations; and the pivot fields, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    /// Every field a row may carry.
    pub all: Vec<Field>,
    /// Pivoted dimensions (non-empty means the Look is pivoted).
    pub pivots: Vec<Field>,
}

/// A kept cell of one row.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Cell {
    /// The row has no cell for the field.
    #[default]
    Missing,
    /// The cell's `value` when it is not a number (possibly `null`).
    Value(Value),
    /// A numeric `value`, as the text Looker sent (digits are never rounded through a float).
    Number(String),
    /// A pivoted cell: keyed by pivot value instead of carrying a `value`.
    Pivoted,
    /// Not a `{"value": ...}` object.
    Malformed,
}

/// Receives the parsed result. Returning `Err(Stop)` ends the parse; the sink keeps the
/// reason itself.
pub trait RowSink {
    /// Called once with the field list; returns the names of the fields whose cells each
    /// row must carry, in the order [`RowSink::row`] receives them.
    fn fields(&mut self, fields: &Fields) -> Result<Vec<String>, Stop>;
    /// Called for each row (numbered from 1) with the kept cells.
    fn row(&mut self, number: u64, cells: &mut [Cell]) -> Result<(), Stop>;
    /// Called instead of [`RowSink::row`] for a row that is not an object (`null`, a number,
    /// an array): `what` says which. Such a row is the sink's to count; the parse goes on.
    fn bad_row(&mut self, number: u64, what: BadRow) -> Result<(), Stop> {
        let _ = (number, what);
        Ok(())
    }
}

/// A row of `data` that is not a row object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRow {
    /// The row is `null`.
    Null,
    /// The row is a string, number, boolean or array.
    NotAnObject,
}

/// The sink asked the parser to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop;

/// Why a body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum DetailError {
    /// The sink stopped the parse.
    #[error("stopped by the export")]
    Stopped,
    /// Reading the body failed (the reader's error is kept as is).
    #[error("reading the body failed: {0}")]
    Io(std::io::Error),
    /// Not JSON, cut off, or not shaped like `json_detail`.
    #[error("{0}")]
    Syntax(String),
    /// `data` came before `fields`.
    #[error("the body has data before fields")]
    DataBeforeFields,
    /// The body has no `fields` object.
    #[error("the body has no fields")]
    NoFields,
    /// Looker reported errors running the query.
    #[error("{}", .0.join("; "))]
    QueryErrors(Vec<String>),
    /// The result is pivoted.
    #[error("{0}")]
    Pivoted(String),
}

/// Parses a whole `json_detail` body from `reader` (buffer it: serde reads byte by byte).
/// Returns the number of rows handed to the sink.
pub fn parse<R: Read, S: RowSink>(reader: R, sink: &mut S) -> Result<u64, DetailError> {
    let mut state = State::default();
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = Document {
        sink: &mut *sink,
        state: &mut state,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    if let Some(stop) = state.stop.take() {
        return Err(stop);
    }
    if let Err(e) = result {
        return Err(classify(e, state.rows));
    }
    if !state.query_errors.is_empty() {
        return Err(DetailError::QueryErrors(state.query_errors));
    }
    if !state.saw_fields {
        return Err(DetailError::NoFields);
    }
    Ok(state.rows)
}

fn classify(e: serde_json::Error, rows: u64) -> DetailError {
    if e.is_io() {
        let kind = e.io_error_kind().unwrap_or(std::io::ErrorKind::Other);
        return DetailError::Io(std::io::Error::new(kind, e.to_string()));
    }
    let what = if e.is_eof() {
        "the body ended early"
    } else {
        "the body is malformed"
    };
    DetailError::Syntax(format!(
        "{what} after {rows} complete rows ({})",
        where_and_why(&e)
    ))
}

/// Where parsing failed and what was expected there, without quoting the body: serde's own
/// messages quote the offending text (`invalid type: string "…"`), and the body may be any
/// internal service's answer.
fn where_and_why(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("at line {}, column {}", e.line(), e.column());
    match e.classify() {
        Category::Eof => format!("{at}: the JSON text is incomplete"),
        Category::Syntax => format!("{at}: not valid JSON"),
        Category::Data => match unquoted_reason(&e.to_string()) {
            Some(why) => format!("{at}: not json_detail, {why}"),
            None => format!("{at}: not json_detail"),
        },
        Category::Io => at,
    }
}

/// Rebuilds the safe part of a serde data error: the kind of value found (never the value)
/// and what was expected (the parser's own words), or a missing field's name.
fn unquoted_reason(message: &str) -> Option<String> {
    // serde_json appends " at line L column C"; the parts before are serde's.
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    if let Some(field) = message.strip_prefix("missing field `") {
        let field = field.strip_suffix('`')?;
        return Some(format!("missing field {}", clean(field, 40)));
    }
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?;
    // The found value comes first and may itself contain ", expected ": split at the last.
    let (found, expected) = rest.rsplit_once(", expected ")?;
    let kind = match found.split([' ', ',']).next()? {
        "string" => "a string",
        "integer" | "floating" => "a number",
        "boolean" => "a boolean",
        "map" => "an object",
        "sequence" => "an array",
        "unit" | "null" => "null",
        _ => "a value",
    };
    Some(format!(
        "found {kind} where {} was expected",
        clean(expected, 60)
    ))
}

#[derive(Default)]
struct State {
    captures: Option<Vec<String>>,
    cells: Vec<Cell>,
    rows: u64,
    saw_fields: bool,
    query_errors: Vec<String>,
    stop: Option<DetailError>,
}

impl State {
    fn fail<E: de::Error>(&mut self, why: DetailError) -> E {
        self.stop = Some(why);
        E::custom("stopped")
    }
}

struct Document<'a, S> {
    sink: &'a mut S,
    state: &'a mut State,
}

impl<'de, S: RowSink> DeserializeSeed<'de> for Document<'_, S> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S: RowSink> Visitor<'de> for Document<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json_detail object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Document { sink, state } = self;
        while let Some(key) = map.next_key::<TopKey>()? {
            match key {
                TopKey::Fields => {
                    let raw: RawFields = map.next_value()?;
                    let fields = raw.into_fields();
                    state.saw_fields = true;
                    if !fields.pivots.is_empty() {
                        let names: Vec<&str> =
                            fields.pivots.iter().map(|f| f.name.as_str()).collect();
                        return Err(state.fail(DetailError::Pivoted(format!(
                            "pivoted on {}",
                            name_list(&names, 5)
                        ))));
                    }
                    match sink.fields(&fields) {
                        Ok(captures) => {
                            state.cells = vec![Cell::Missing; captures.len()];
                            state.captures = Some(captures);
                        }
                        Err(Stop) => return Err(state.fail(DetailError::Stopped)),
                    }
                }
                TopKey::Data => {
                    if state.captures.is_none() {
                        return Err(state.fail(DetailError::DataBeforeFields));
                    }
                    map.next_value_seed(Data {
                        sink: &mut *sink,
                        state: &mut *state,
                    })?;
                }
                TopKey::Pivots => {
                    let v: Value = map.next_value()?;
                    if v.as_array().is_some_and(|a| !a.is_empty()) {
                        return Err(
                            state.fail(DetailError::Pivoted("the result has pivot columns".into()))
                        );
                    }
                }
                TopKey::Errors => {
                    let v: Value = map.next_value()?;
                    // A body repeating the key must not grow the message without end.
                    if state.query_errors.is_empty() {
                        state.query_errors = error_messages(&v);
                    }
                }
                TopKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Messages of Looker's `errors` array: each entry's `message`, cleaned and cut so a status
/// stays readable, at most [`MAX_QUERY_ERRORS`] of them. An entry without one is not quoted
/// (it could be anything the answering service sent).
fn error_messages(v: &Value) -> Vec<String> {
    let Some(items) = v.as_array() else {
        return Vec::new();
    };
    let mut messages: Vec<String> = items
        .iter()
        .take(MAX_QUERY_ERRORS)
        .map(|e| match e.get("message").and_then(Value::as_str) {
            Some(m) if !clean(m, 1).is_empty() => clean(m, MAX_MESSAGE_CHARS),
            _ => "an error without a message".to_owned(),
        })
        .collect();
    if items.len() > MAX_QUERY_ERRORS {
        messages.push(format!(
            "and {} more errors",
            items.len() - MAX_QUERY_ERRORS
        ));
    }
    messages
}

/// Query errors quoted in a message; the rest are counted.
const MAX_QUERY_ERRORS: usize = 3;

enum TopKey {
    Fields,
    Data,
    Pivots,
    Errors,
    Other,
}

impl<'de> Deserialize<'de> for TopKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TopKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TopKey, E> {
                Ok(match s {
                    "fields" => TopKey::Fields,
                    "data" => TopKey::Data,
                    "pivots" => TopKey::Pivots,
                    "errors" => TopKey::Errors,
                    _ => TopKey::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize)]
#[serde(expecting = "a fields object")]
struct RawFields {
    #[serde(default)]
    dimensions: Option<Vec<RawField>>,
    #[serde(default)]
    measures: Option<Vec<RawField>>,
    #[serde(default)]
    filters: Option<Vec<RawField>>,
    #[serde(default)]
    parameters: Option<Vec<RawField>>,
    #[serde(default)]
    table_calculations: Option<Vec<RawField>>,
    #[serde(default)]
    pivots: Option<Vec<RawField>>,
}

#[derive(Deserialize)]
#[serde(expecting = "a field object")]
struct RawField {
    name: String,
    #[serde(default)]
    tags: Option<Vec<Value>>,
}

impl RawFields {
    fn into_fields(self) -> Fields {
        let convert = |list: Option<Vec<RawField>>| {
            list.unwrap_or_default().into_iter().map(|f| Field {
                name: f.name,
                tags: f
                    .tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect(),
            })
        };
        let all = convert(self.dimensions)
            .chain(convert(self.measures))
            .chain(convert(self.filters))
            .chain(convert(self.parameters))
            .chain(convert(self.table_calculations))
            .collect();
        Fields {
            all,
            pivots: convert(self.pivots).collect(),
        }
    }
}

struct Data<'a, S> {
    sink: &'a mut S,
    state: &'a mut State,
}

impl<'de, S: RowSink> DeserializeSeed<'de> for Data<'_, S> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S: RowSink> Visitor<'de> for Data<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Data { sink, state } = self;
        let captures = state.captures.take().unwrap_or_default();
        let mut cells = std::mem::take(&mut state.cells);
        let result = loop {
            cells.fill(Cell::Missing);
            let row = RowSeed {
                captures: &captures,
                cells: &mut cells,
                pivoted: false,
            };
            let shape = match seq.next_element_seed(row) {
                Ok(Some(shape)) => shape,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            state.rows += 1;
            let handed = match shape {
                RowShape::Object { pivoted: true } => {
                    break Err(state.fail(DetailError::Pivoted(format!(
                        "row {} has pivoted cells",
                        state.rows
                    ))));
                }
                RowShape::Object { pivoted: false } => sink.row(state.rows, &mut cells),
                RowShape::Bad(what) => sink.bad_row(state.rows, what),
            };
            if handed.is_err() {
                break Err(state.fail(DetailError::Stopped));
            }
        };
        state.captures = Some(captures);
        state.cells = cells;
        result
    }
}

/// What one element of `data` turned out to be.
enum RowShape {
    /// A row object; `pivoted` when any cell was pivoted.
    Object { pivoted: bool },
    /// Not a row object.
    Bad(BadRow),
}

/// Fills the kept cells of one row and says what the row was.
struct RowSeed<'a> {
    captures: &'a [String],
    cells: &'a mut [Cell],
    pivoted: bool,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = RowShape;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RowShape, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! not_a_row {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<RowShape, E> {
            Ok(RowShape::Bad(BadRow::NotAnObject))
        })*
    };
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = RowShape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row object keyed by field name")
    }

    fn visit_unit<E: de::Error>(self) -> Result<RowShape, E> {
        Ok(RowShape::Bad(BadRow::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RowShape, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RowShape::Bad(BadRow::NotAnObject))
    }

    not_a_row!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<RowShape, A::Error> {
        while let Some(index) = map.next_key_seed(KeyIndex(self.captures))? {
            let cell = map.next_value_seed(CellSeed {
                keep: index.is_some(),
            })?;
            if cell == Cell::Pivoted {
                self.pivoted = true;
            }
            if let Some(i) = index {
                self.cells[i] = cell;
            }
        }
        Ok(RowShape::Object {
            pivoted: self.pivoted,
        })
    }
}

/// Looks a row key up among the kept fields without allocating.
struct KeyIndex<'a>(&'a [String]);

impl<'de> DeserializeSeed<'de> for KeyIndex<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIndex<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|c| c == s))
    }
}

/// Reads one cell: keeps its `value` when asked, and tells pivoted or malformed cells apart.
struct CellSeed {
    keep: bool,
}

impl<'de> DeserializeSeed<'de> for CellSeed {
    type Value = Cell;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! malformed_scalars {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<Cell, E> { Ok(Cell::Malformed) })*
    };
}

impl<'de> Visitor<'de> for CellSeed {
    type Value = Cell;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cell object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cell, A::Error> {
        let mut value = None;
        let mut nested = false;
        while let Some(is_value) = map.next_key_seed(IsValueKey)? {
            if is_value {
                value = Some(if self.keep {
                    map.next_value_seed(KeptValue)?
                } else {
                    map.next_value::<IgnoredAny>()
                        .map(|_| Cell::Value(Value::Null))?
                });
            } else {
                nested |= map.next_value_seed(IsObject)?;
            }
        }
        Ok(match value {
            Some(v) => v,
            None if nested => Cell::Pivoted,
            None => Cell::Malformed,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cell, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Cell::Malformed)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Malformed)
    }

    malformed_scalars!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
}

/// Reads a kept `value`. Numbers keep the text Looker sent: small integers arrive as
/// integers, and every other number arrives as a string marked by the body filter
/// ([`cap::NUMBER_MARK`]), so no digit is rounded through a float.
struct KeptValue;

impl<'de> DeserializeSeed<'de> for KeptValue {
    type Value = Cell;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeptValue {
    type Value = Cell;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cell value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Cell, E> {
        Ok(match cap::unmark(s) {
            Some(number) => Cell::Number(number.to_owned()),
            None => Cell::Value(Value::String(s.to_owned())),
        })
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Cell, E> {
        if cap::unmark(&s).is_some() {
            return self.visit_str(&s);
        }
        Ok(Cell::Value(Value::String(s)))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Cell, E> {
        Ok(Cell::Number(n.to_string()))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Cell, E> {
        Ok(Cell::Number(n.to_string()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Cell, E> {
        // Only reached when the body did not pass through the filter (tests).
        Ok(Cell::Number(n.to_string()))
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Cell, E> {
        Ok(Cell::Value(Value::Bool(b)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Value(Value::Null))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Cell, A::Error> {
        let v = Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Cell::Value(unmark_all(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Cell, A::Error> {
        let v = Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Cell::Value(unmark_all(v)))
    }
}

/// Turns marked numbers nested in a structured value back into numbers.
fn unmark_all(v: Value) -> Value {
    match v {
        Value::String(s) => match cap::unmark(&s).and_then(|t| t.parse().ok()) {
            Some(n) => Value::Number(n),
            None => Value::String(s),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(unmark_all).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, unmark_all(v))).collect()),
        other => other,
    }
}

struct IsValueKey;

impl<'de> DeserializeSeed<'de> for IsValueKey {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for IsValueKey {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cell key")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<bool, E> {
        Ok(s == "value")
    }
}

/// Skips a value, saying whether it was an object (pivoted cells nest objects).
struct IsObject;

impl<'de> DeserializeSeed<'de> for IsObject {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! not_object {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<bool, E> { Ok(false) })*
    };
}

impl<'de> Visitor<'de> for IsObject {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    not_object!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Keeps the named fields and records every row.
    #[derive(Default)]
    struct Collect {
        keep: Vec<String>,
        seen_fields: Option<Fields>,
        rows: Vec<(u64, Vec<Cell>)>,
        stop_at: Option<u64>,
    }

    impl RowSink for Collect {
        fn fields(&mut self, fields: &Fields) -> Result<Vec<String>, Stop> {
            self.seen_fields = Some(fields.clone());
            Ok(self.keep.clone())
        }
        fn row(&mut self, number: u64, cells: &mut [Cell]) -> Result<(), Stop> {
            if self.stop_at == Some(number) {
                return Err(Stop);
            }
            self.rows.push((number, cells.to_vec()));
            Ok(())
        }
    }

    fn collect(body: &str, keep: &[&str]) -> (Collect, Result<u64, DetailError>) {
        let mut sink = Collect {
            keep: keep.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let r = parse(body.as_bytes(), &mut sink);
        (sink, r)
    }

    #[test]
    fn parses_looker_s_own_example() {
        let body = include_str!("../../tests/data/looker-json-detail-example.json");
        let (sink, r) = collect(body, &["orders.created_month", "orders.count"]);
        let rows = r.expect("parses");
        assert_eq!(rows as usize, sink.rows.len());
        assert!(rows > 5);
        let fields = sink.seen_fields.unwrap();
        let names: Vec<&str> = fields.all.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["orders.created_month", "orders.count"],
            "dimensions come before measures"
        );
        assert_eq!(
            sink.rows[0].1,
            vec![Cell::Value(json!("2017-07")), Cell::Number("773".into())]
        );
    }

    #[test]
    fn keeps_only_asked_cells_and_reports_missing_ones() {
        let body = json!({
            "fields": {"dimensions": [{"name": "u.id", "tags": ["braze_id", 7]}], "measures": null},
            "data": [
                {"u.id": {"value": "a", "rendered": "A", "links": [{"url": "x"}]}, "u.other": {"value": 1}},
                {"u.other": {"value": 2}},
                {"u.id": {"rendered": "no value"}},
                {"u.id": 5}
            ]
        });
        let (sink, r) = collect(&body.to_string(), &["u.id"]);
        assert_eq!(r.unwrap(), 4);
        assert_eq!(sink.seen_fields.unwrap().all[0].tags, ["braze_id"]);
        let cells: Vec<Cell> = sink.rows.into_iter().map(|(_, c)| c[0].clone()).collect();
        assert_eq!(
            cells,
            [
                Cell::Value(json!("a")),
                Cell::Missing,
                Cell::Malformed,
                Cell::Malformed
            ]
        );
    }

    #[test]
    fn refuses_pivots_in_fields_top_level_or_cells() {
        let fields = json!({"dimensions": [{"name": "u.id"}], "pivots": [{"name": "o.status"}]});
        let (_, r) = collect(
            &json!({"fields": fields, "data": []}).to_string(),
            &["u.id"],
        );
        assert!(matches!(r, Err(DetailError::Pivoted(m)) if m.contains("o.status")));

        let body = json!({"fields": {"dimensions": [{"name": "u.id"}]}, "pivots": [{"key": "complete"}], "data": []});
        assert!(matches!(
            collect(&body.to_string(), &["u.id"]).1,
            Err(DetailError::Pivoted(_))
        ));

        let body = json!({"fields": {"dimensions": [{"name": "u.id"}], "measures": [{"name": "o.count"}]},
            "data": [{"u.id": {"value": "a"}, "o.count": {"complete": {"value": 1}, "cancelled": {"value": null}}}]});
        let (sink, r) = collect(&body.to_string(), &["u.id"]);
        assert!(matches!(r, Err(DetailError::Pivoted(m)) if m == "row 1 has pivoted cells"));
        assert!(sink.rows.is_empty(), "the pivoted row is not handed on");
    }

    #[test]
    fn truncated_and_malformed_bodies_say_where() {
        let body = json!({"fields": {"dimensions": [{"name": "u.id"}]}, "data": [{"u.id": {"value": "a"}}, {"u.id": {"value": "b"}}]})
            .to_string();
        let cut = &body[..body.len() - 12];
        let (sink, r) = collect(cut, &["u.id"]);
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.starts_with("the body ended early after 1 complete rows"),
            "{msg}"
        );
        assert_eq!(sink.rows.len(), 1);
        for bad in [
            "",
            "[]",
            "{\"fields\": 3}",
            "<html>502 Bad Gateway</html>",
            "{\"fields\":{}} trailing",
        ] {
            let (_, r) = collect(bad, &[]);
            assert!(matches!(r, Err(DetailError::Syntax(_))), "{bad}: {r:?}");
        }
    }

    #[test]
    fn parse_errors_say_where_but_never_quote_the_body() {
        let cases = [
            (
                r#"{"fields": "tok-LEAK"}"#,
                "the body is malformed after 0 complete rows (at line 1, column 21: not json_detail, found a string where a fields object was expected)",
            ),
            (
                r#"{"fields": {"dimensions": "tok-LEAK, expected x"}}"#,
                "the body is malformed after 0 complete rows (at line 1, column 48: not json_detail, found a string where a sequence was expected)",
            ),
            (
                r#"{"fields": {"dimensions": [{"name": 7}]}}"#,
                "the body is malformed after 0 complete rows (at line 1, column 38: not json_detail, found a number where a string was expected)",
            ),
            (
                r#"{"fields": {"dimensions": [{"tags": ["tok-LEAK"]}]}}"#,
                "the body is malformed after 0 complete rows (at line 1, column 49: not json_detail, missing field name)",
            ),
            (
                r#"{"fields": {"dimensions": [true]}}"#,
                "the body is malformed after 0 complete rows (at line 1, column 31: not json_detail, found a boolean where a field object was expected)",
            ),
            (
                "<html><title>tok-LEAK</title></html>",
                "the body is malformed after 0 complete rows (at line 1, column 1: not valid JSON)",
            ),
            (
                r#"{"access_token": "tok-LEAK"} tok-LEAK"#,
                "the body is malformed after 0 complete rows (at line 1, column 30: not valid JSON)",
            ),
            (
                r#"{"access_token": "tok-LEAK"#,
                "the body ended early after 0 complete rows (at line 1, column 26: the JSON text is incomplete)",
            ),
        ];
        for (body, want) in cases {
            let (_, r) = collect(body, &[]);
            let msg = r.unwrap_err().to_string();
            assert_eq!(msg, want, "{body}");
            assert!(!msg.contains("tok-LEAK"), "{msg}");
        }
    }

    #[test]
    fn query_errors_quote_only_looker_s_messages() {
        let many: Vec<Value> = (0..10)
            .map(|i| json!({"message": format!("e{i}")}))
            .collect();
        let (_, r) = collect(
            &json!({"fields": {}, "data": [], "errors": many}).to_string(),
            &[],
        );
        assert_eq!(r.unwrap_err().to_string(), "e0; e1; e2; and 7 more errors");
        let (_, r) = collect(
            &json!({"fields": {}, "data": [], "errors": [
                {"access_token": "tok-LEAK"},
                {"message": "bad\nSQL\u{1b}[0m ".to_owned() + &"x".repeat(300)},
            ]})
            .to_string(),
            &[],
        );
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.starts_with("an error without a message; bad SQL [0m xxx"),
            "{msg}"
        );
        assert!(
            !msg.contains("tok-LEAK") && msg.chars().count() < 260,
            "{msg}"
        );
    }

    #[test]
    fn pivot_names_are_bounded() {
        let pivots: Vec<Value> = (0..9).map(|i| json!({"name": format!("p{i}\n")})).collect();
        let body = json!({"fields": {"dimensions": [], "pivots": pivots}, "data": []});
        let (_, r) = collect(&body.to_string(), &[]);
        assert_eq!(
            r.unwrap_err().to_string(),
            "pivoted on p0, p1, p2, p3, p4, 4 more"
        );
    }

    #[test]
    fn order_errors_and_missing_fields() {
        let (_, r) = collect(r#"{"data": [], "fields": {}}"#, &[]);
        assert!(matches!(r, Err(DetailError::DataBeforeFields)));
        let (_, r) = collect(r#"{"data2": []}"#, &[]);
        assert!(matches!(r, Err(DetailError::NoFields)));
        let (_, r) = collect(
            r#"{"fields": {}, "data": [], "errors": [{"message": "Unknown column 'x'", "sql_error": true}]}"#,
            &[],
        );
        assert_eq!(r.unwrap_err().to_string(), "Unknown column 'x'");
    }

    #[test]
    fn a_stopping_sink_stops_the_parse() {
        let body =
            json!({"fields": {"dimensions": [{"name": "u.id"}]}, "data": [{}, {}, {}]}).to_string();
        let mut sink = Collect {
            stop_at: Some(2),
            ..Default::default()
        };
        assert!(matches!(
            parse(body.as_bytes(), &mut sink),
            Err(DetailError::Stopped)
        ));
        assert_eq!(sink.rows.len(), 1);
    }
}
