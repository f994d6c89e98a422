//! Streaming parser for Looker's `json_detail` result format.
//!
//! The body is one JSON object; `fields` comes before `data`. The parser walks it with
//! serde, hands the field list to a [`RowSink`] (which answers with the fields it needs),
//! then hands over each row with only those cells kept, and forgets the row. Memory does not
//! grow with the number of rows.
//!
//! Nor with the size of any part of the answer; what is kept of each is bounded, and the
//! rest is skipped with [`IgnoredAny`], which holds nothing (strings are already cut to
//! [`cap::MAX_STRING_BYTES`] by the body filter):
//!
//! - a kept array or object cell `value` is built within a budget of [`MAX_CELL_BYTES`]: each
//!   element (scalar, array, object, key) costs [`ELEMENT_COST`] bytes, about what it takes
//!   in memory, plus the bytes of its text if it is a string or a key. Past the budget, or at
//!   a string the filter may have cut, the value is dropped and the rest of it skipped; the
//!   cell becomes [`Cell::TooLarge`], which the mapping counts as an invalid row (never sent
//!   cut). The budget is above what Braze itself takes (nested objects up to 100 KB, arrays
//!   of at most 500 items, strings of 255 characters): 500 × (255 + 32) bytes fit;
//! - `fields` keeps the name and string tags of at most [`MAX_FIELDS`] fields, taking at
//!   most [`MAX_FIELDS_BYTES`] together; beyond either the parse fails with a message that
//!   says so, rather than dropping fields that may carry the `braze_id` tag;
//! - top-level `pivots` is read up to its first entry (any entry refuses the Look);
//! - `errors` keeps the `message` of its first 3 entries (`MAX_QUERY_ERRORS`) and counts the
//!   rest;
//! - any other top-level key, and every cell of a field not kept, is skipped.

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
    /// A `value` over its budget: an array or object over [`MAX_CELL_BYTES`], or any value
    /// past what is left of the row's [`MAX_ROW_BYTES`]. Not kept.
    TooLarge,
}

/// Budget of a kept array or object cell value, in bytes as [`ELEMENT_COST`] counts them.
pub const MAX_CELL_BYTES: usize = 256 * 1024;
/// What each element of a structured cell value costs against [`MAX_CELL_BYTES`], besides
/// the text of strings and keys.
pub const ELEMENT_COST: usize = 32;
/// Budget of all the kept cells of one row together (strings at their length, structured
/// values as [`MAX_CELL_BYTES`] counts them): a row's objects fit one Braze request.
pub const MAX_ROW_BYTES: usize = 1024 * 1024;
/// Most fields a result may list (all sections together, pivot fields included).
pub const MAX_FIELDS: usize = 10_000;
/// Most bytes of field names and string tags a result's `fields` may take.
pub const MAX_FIELDS_BYTES: usize = 1024 * 1024;

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
    /// `fields` lists more than the parser keeps ([`MAX_FIELDS`], [`MAX_FIELDS_BYTES`]).
    #[error("{0}")]
    FieldsTooLarge(String),
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
                    let mut budget = FieldBudget::default();
                    let fields = match map.next_value_seed(FieldsSeed(&mut budget)) {
                        Ok(fields) => fields,
                        Err(e) => {
                            return Err(match budget.exceeded.take() {
                                Some(why) => state.fail(why),
                                None => e,
                            });
                        }
                    };
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
                    let mut found = false;
                    let read = map.next_value_seed(FirstEntry(&mut found));
                    if found {
                        return Err(
                            state.fail(DetailError::Pivoted("the result has pivot columns".into()))
                        );
                    }
                    read?;
                }
                TopKey::Errors => {
                    // A body repeating the key must not grow the message without end.
                    if state.query_errors.is_empty() {
                        state.query_errors = map.next_value_seed(ErrorMessages)?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
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

/// The messages of Looker's `errors` array: each entry's `message`, cleaned and cut so a
/// status stays readable, at most [`MAX_QUERY_ERRORS`] of them, then how many more there
/// are. An entry without one is not quoted (it could be anything the answering service
/// sent). Anything but an array carries no messages.
struct ErrorMessages;

impl<'de> DeserializeSeed<'de> for ErrorMessages {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! no_messages {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<Vec<String>, E> { Ok(Vec::new()) })*
    };
}

impl<'de> Visitor<'de> for ErrorMessages {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of errors")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut messages = Vec::new();
        while messages.len() < MAX_QUERY_ERRORS {
            match seq.next_element_seed(ErrorMessage)? {
                Some(m) => messages.push(m.unwrap_or_else(|| "an error without a message".into())),
                None => return Ok(messages),
            }
        }
        let mut more = 0_u64;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            more += 1;
        }
        if more > 0 {
            messages.push(format!("and {more} more errors"));
        }
        Ok(messages)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Vec::new())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    no_messages!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
}

/// One entry of `errors`: its `message` when that is a non-blank string (the last one, if
/// the key repeats), cleaned and cut.
struct ErrorMessage;

impl<'de> DeserializeSeed<'de> for ErrorMessage {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! no_message {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<Option<String>, E> { Ok(None) })*
    };
}

impl<'de> Visitor<'de> for ErrorMessage {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an error object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        let mut message = None;
        while let Some(is_message) = map.next_key_seed(KeyIs("message"))? {
            if is_message {
                message = map.next_value_seed(Text)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(message
            .filter(|m| !clean(m, 1).is_empty())
            .map(|m| clean(&m, MAX_MESSAGE_CHARS)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    no_message!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
}

/// A string value, or `None` for anything else (skipped).
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<String>, E> {
        Ok(Some(s.to_owned()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    no_message!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64);
}

/// Whether a key is `self.0`.
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<bool, E> {
        Ok(s == self.0)
    }
}

/// What is left of the bounds on `fields` ([`MAX_FIELDS`], [`MAX_FIELDS_BYTES`]), and which
/// one was passed.
struct FieldBudget {
    fields: usize,
    bytes: usize,
    exceeded: Option<DetailError>,
}

impl Default for FieldBudget {
    fn default() -> Self {
        Self {
            fields: MAX_FIELDS,
            bytes: MAX_FIELDS_BYTES,
            exceeded: None,
        }
    }
}

impl FieldBudget {
    fn take_field<E: de::Error>(&mut self) -> Result<(), E> {
        match self.fields.checked_sub(1) {
            Some(left) => {
                self.fields = left;
                Ok(())
            }
            None => Err(self.exceed(format!("the result lists more than {MAX_FIELDS} fields"))),
        }
    }

    fn take_text<E: de::Error>(&mut self, text: &str) -> Result<(), E> {
        self.take_bytes(text.len())
    }

    /// One kept name or tag's place, besides its text ([`ELEMENT_COST`] bytes).
    fn take_element<E: de::Error>(&mut self) -> Result<(), E> {
        self.take_bytes(ELEMENT_COST)
    }

    fn take_bytes<E: de::Error>(&mut self, n: usize) -> Result<(), E> {
        match self.bytes.checked_sub(n) {
            Some(left) => {
                self.bytes = left;
                Ok(())
            }
            None => Err(self.exceed(format!(
                "the result's field names and tags take more than {} MiB",
                MAX_FIELDS_BYTES >> 20
            ))),
        }
    }

    fn exceed<E: de::Error>(&mut self, why: String) -> E {
        self.exceeded = Some(DetailError::FieldsTooLarge(why));
        E::custom("stopped")
    }
}

/// The sections of `fields` that list fields, in the order [`Fields::all`] joins them
/// (`pivots` last, kept apart).
const FIELD_SECTIONS: [&str; 6] = [
    "dimensions",
    "measures",
    "filters",
    "parameters",
    "table_calculations",
    "pivots",
];

/// Reads `fields` within a [`FieldBudget`]: the sections of [`FIELD_SECTIONS`] (each a list
/// or `null`), and of each field its name and string tags; everything else is skipped.
struct FieldsSeed<'b>(&'b mut FieldBudget);

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = Fields;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a fields object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut sections: [Option<Vec<Field>>; 6] = Default::default();
        while let Some(section) = map.next_key_seed(SectionKey)? {
            let Some(i) = section else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if sections[i].is_some() {
                return Err(de::Error::duplicate_field(FIELD_SECTIONS[i]));
            }
            let mut list = Vec::new();
            map.next_value_seed(FieldList {
                budget: &mut *self.0,
                out: &mut list,
            })?;
            sections[i] = Some(list);
        }
        let [d, m, f, p, t, pivots] = sections;
        let all = [d, m, f, p, t].into_iter().flatten().flatten().collect();
        Ok(Fields {
            all,
            pivots: pivots.unwrap_or_default(),
        })
    }
}

/// The index of a key in [`FIELD_SECTIONS`].
struct SectionKey;

impl<'de> DeserializeSeed<'de> for SectionKey {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for SectionKey {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<usize>, E> {
        Ok(FIELD_SECTIONS.iter().position(|k| *k == s))
    }
}

/// A list of field objects, or `null`, appended to `out`.
struct FieldList<'a> {
    budget: &'a mut FieldBudget,
    out: &'a mut Vec<Field>,
}

impl<'de> DeserializeSeed<'de> for FieldList<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for FieldList<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(field) = seq.next_element_seed(FieldSeed(&mut *self.budget))? {
            self.out.push(field);
        }
        Ok(())
    }
}

/// One field object: its `name` and string `tags` (a list or `null`), within the budget.
struct FieldSeed<'b>(&'b mut FieldBudget);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Field;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Field;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        self.0.take_field()?;
        let (mut name, mut tags) = (None, None);
        while let Some(key) = map.next_key::<FieldKey>()? {
            match key {
                FieldKey::Name if name.is_some() => return Err(de::Error::duplicate_field("name")),
                FieldKey::Name => {
                    let n: String = map.next_value()?;
                    self.0.take_text(&n)?;
                    name = Some(n);
                }
                FieldKey::Tags if tags.is_some() => return Err(de::Error::duplicate_field("tags")),
                FieldKey::Tags => {
                    let mut list = Vec::new();
                    map.next_value_seed(TagList {
                        budget: &mut *self.0,
                        out: &mut list,
                    })?;
                    tags = Some(list);
                }
                FieldKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Field {
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            tags: tags.unwrap_or_default(),
        })
    }
}

enum FieldKey {
    Name,
    Tags,
    Other,
}

impl<'de> Deserialize<'de> for FieldKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FieldKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldKey, E> {
                Ok(match s {
                    "name" => FieldKey::Name,
                    "tags" => FieldKey::Tags,
                    _ => FieldKey::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A field's `tags` (a list or `null`): string tags are appended to `out` within the
/// budget, others are skipped.
struct TagList<'a> {
    budget: &'a mut FieldBudget,
    out: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for TagList<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for TagList<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(tag) = seq.next_element_seed(Text)? {
            if let Some(tag) = tag {
                // A tag costs its text and its place: `["", "", …]` is not free.
                self.budget.take_text(&tag)?;
                self.budget.take_element()?;
                self.out.push(tag);
            }
        }
        Ok(())
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
                left: MAX_ROW_BYTES,
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
    /// What is left of the row's [`MAX_ROW_BYTES`].
    left: usize,
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
                left: &mut self.left,
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
struct CellSeed<'a> {
    keep: bool,
    /// What is left of the row's budget.
    left: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for CellSeed<'_> {
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

impl<'de> Visitor<'de> for CellSeed<'_> {
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
                    map.next_value_seed(KeptValue(&mut *self.left))?
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

/// Reads a kept `value`, charged to what is left of the row's budget. Numbers keep the
/// text Looker sent: small integers arrive as integers, and every other number arrives as a
/// string marked by the body filter ([`cap::NUMBER_MARK`]), so no digit is rounded through a
/// float.
struct KeptValue<'a>(&'a mut usize);

impl KeptValue<'_> {
    /// `cell`, if its `cost` fits what is left of the row.
    fn charged(self, cost: usize, cell: Cell) -> Cell {
        match self.0.checked_sub(cost) {
            Some(left) => {
                *self.0 = left;
                cell
            }
            None => Cell::TooLarge,
        }
    }

    /// A structured value within its own budget and what is left of the row's.
    fn structured<E>(
        self,
        build: impl FnOnce(&mut usize) -> Result<Option<Value>, E>,
    ) -> Result<Cell, E> {
        let start = MAX_CELL_BYTES.min(*self.0);
        let mut budget = start;
        let built = build(&mut budget)?;
        *self.0 -= start - budget;
        Ok(built.map_or(Cell::TooLarge, Cell::Value))
    }
}

impl<'de> DeserializeSeed<'de> for KeptValue<'_> {
    type Value = Cell;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeptValue<'_> {
    type Value = Cell;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cell value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Cell, E> {
        let cell = match cap::unmark(s) {
            Some(number) => Cell::Number(number.to_owned()),
            None => Cell::Value(Value::String(s.to_owned())),
        };
        Ok(self.charged(s.len(), cell))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Cell, E> {
        if cap::unmark(&s).is_some() {
            return self.visit_str(&s);
        }
        let cost = s.len();
        Ok(self.charged(cost, Cell::Value(Value::String(s))))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Cell, E> {
        Ok(self.charged(ELEMENT_COST, Cell::Number(n.to_string())))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Cell, E> {
        Ok(self.charged(ELEMENT_COST, Cell::Number(n.to_string())))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Cell, E> {
        // Only reached when the body did not pass through the filter (tests).
        Ok(self.charged(ELEMENT_COST, Cell::Number(n.to_string())))
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Cell, E> {
        Ok(Cell::Value(Value::Bool(b)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Value(Value::Null))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Cell, A::Error> {
        self.structured(|budget| Bounded(budget).visit_map(map))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Cell, A::Error> {
        self.structured(|budget| Bounded(budget).visit_seq(seq))
    }
}

macro_rules! not_object {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<bool, E> { Ok(false) })*
    };
}

/// Builds a structured cell value within what is left of a budget (see the module header),
/// turning marked numbers back into numbers. `None` when the budget ran out or a string may
/// have been cut: the rest of the value has then been skipped, and every enclosing
/// container skips its own rest too.
struct Bounded<'b>(&'b mut usize);

impl Bounded<'_> {
    /// Takes `cost` from the budget; false when less is left.
    fn take(&mut self, cost: usize) -> bool {
        match self.0.checked_sub(cost) {
            Some(left) => {
                *self.0 = left;
                true
            }
            None => false,
        }
    }

    fn scalar(mut self, v: Value) -> Option<Value> {
        self.take(ELEMENT_COST).then_some(v)
    }
}

/// True when a string of this length may have been cut by the body filter.
fn maybe_cut(s: &str) -> bool {
    s.len() >= cap::MAX_STRING_BYTES
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Option<Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cell value")
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Option<Value>, E> {
        Ok(self.scalar(Value::Bool(b)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<Value>, E> {
        Ok(self.scalar(Value::Null))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<Value>, E> {
        Ok(self.scalar(n.into()))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Option<Value>, E> {
        Ok(self.scalar(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Option<Value>, E> {
        Ok(self.scalar(n.into()))
    }
    fn visit_str<E: de::Error>(mut self, s: &str) -> Result<Option<Value>, E> {
        if maybe_cut(s) || !self.take(ELEMENT_COST + s.len()) {
            return Ok(None);
        }
        Ok(Some(
            match cap::unmark(s).and_then(|t| t.parse::<serde_json::Number>().ok()) {
                Some(n) => Value::Number(n),
                None => Value::String(s.to_owned()),
            },
        ))
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Option<Value>, A::Error> {
        let mut items = Vec::new();
        let mut whole = self.take(ELEMENT_COST);
        while whole {
            match seq.next_element_seed(Bounded(&mut *self.0))? {
                Some(Some(v)) => items.push(v),
                Some(None) => whole = false,
                None => return Ok(Some(Value::Array(items))),
            }
        }
        drop(items);
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Option<Value>, A::Error> {
        let mut object = serde_json::Map::new();
        let mut whole = self.take(ELEMENT_COST);
        while whole {
            let Some(key) = map.next_key::<String>()? else {
                return Ok(Some(Value::Object(object)));
            };
            if maybe_cut(&key) || !self.take(ELEMENT_COST + key.len()) {
                map.next_value::<IgnoredAny>()?;
                whole = false;
            } else if let Some(v) = map.next_value_seed(Bounded(&mut *self.0))? {
                object.insert(key, v);
            } else {
                whole = false;
            }
        }
        drop(object);
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// Notes whether a value is an array with at least one entry, and stops the parse there
/// (with an error the caller replaces): the rest is never read. Anything else is skipped.
struct FirstEntry<'a>(&'a mut bool);

impl<'de> DeserializeSeed<'de> for FirstEntry<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! skip_scalars {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<(), E> { Ok(()) })*
    };
}

impl<'de> Visitor<'de> for FirstEntry<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if seq.next_element::<IgnoredAny>()?.is_some() {
            *self.0 = true;
            return Err(de::Error::custom("stopped"));
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    skip_scalars!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
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

    /// The kept `u.a` cell of each row of a body whose rows are given as JSON text.
    fn cells_of(rows: &[String]) -> Vec<Cell> {
        let body = format!(
            r#"{{"fields": {{"dimensions": [{{"name": "u.a"}}, {{"name": "u.b"}}]}}, "data": [{}]}}"#,
            rows.join(",")
        );
        let (sink, r) = collect(&body, &["u.a", "u.b"]);
        assert_eq!(r.expect("parses"), rows.len() as u64);
        sink.rows.into_iter().flat_map(|(_, c)| c).collect()
    }

    /// A row whose `u.a` value is `value` (JSON text) and whose `u.b` value is "next".
    fn row_with(value: &str) -> String {
        format!(r#"{{"u.a": {{"value": {value}, "rendered": "x"}}, "u.b": {{"value": "next"}}}}"#)
    }

    /// `[0,0,…]` with `n` zeros.
    fn zeros(n: usize) -> String {
        format!("[{}]", vec!["0"; n].join(","))
    }

    #[test]
    fn a_structured_value_is_kept_up_to_its_budget_exactly() {
        // The array costs one element, each zero another.
        let fit = MAX_CELL_BYTES / ELEMENT_COST - 1;
        let cells = cells_of(&[row_with(&zeros(fit)), row_with(&zeros(fit + 1))]);
        assert!(
            cells[0] == Cell::Value(Value::Array(vec![json!(0); fit])),
            "kept whole at the budget"
        );
        assert_eq!(cells[1], Cell::Value(json!("next")));
        assert!(cells[2] == Cell::TooLarge, "one element over");
        assert_eq!(
            cells[3],
            Cell::Value(json!("next")),
            "the rest of the row is read"
        );
    }

    #[test]
    fn a_row_s_cells_share_one_budget() {
        // Five kept cells, each a 60,000-byte string (under the 64 KiB cap) or an array
        // within its own budget: together they may take the row's MAX_ROW_BYTES, no more.
        let names: Vec<String> = (0..20).map(|i| format!("u.c{i}")).collect();
        let fields: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
        let text = "s".repeat(60_000);
        let row: serde_json::Map<String, Value> = names
            .iter()
            .map(|n| (n.clone(), json!({"value": text})))
            .collect();
        let body =
            json!({"fields": {"dimensions": fields}, "data": [row, {"u.c0": {"value": "next"}}]});
        let keep: Vec<&str> = names.iter().map(String::as_str).collect();
        let (sink, r) = collect(&body.to_string(), &keep);
        assert_eq!(r.expect("parses"), 2);
        let first = &sink.rows[0].1;
        let fit = MAX_ROW_BYTES / 60_000;
        assert!(
            first[..fit].iter().all(|c| *c == Cell::Value(json!(text))),
            "{fit} fit"
        );
        assert!(
            first[fit..].iter().all(|c| *c == Cell::TooLarge),
            "the rest do not"
        );
        assert_eq!(
            sink.rows[1].1[0],
            Cell::Value(json!("next")),
            "a new row, a new budget"
        );
    }

    #[test]
    fn strings_and_keys_cost_their_bytes_at_any_depth() {
        // {"k": [4 strings of 60,000 bytes, a last one]}: object, key "k", array, strings.
        let strings = |last: usize| {
            let mut list = vec!["s".repeat(60_000); 4];
            list.push("t".repeat(last));
            list
        };
        let fixed = 3 * ELEMENT_COST + 1 + 4 * (ELEMENT_COST + 60_000) + ELEMENT_COST;
        let last = MAX_CELL_BYTES - fixed;
        let nested = |last: usize| json!({"k": strings(last)}).to_string();
        let cells = cells_of(&[row_with(&nested(last)), row_with(&nested(last + 1))]);
        assert!(
            cells[0] == Cell::Value(json!({"k": strings(last)})),
            "kept whole at the budget"
        );
        assert!(cells[2] == Cell::TooLarge, "one byte over");
        assert_eq!(cells[3], Cell::Value(json!("next")));
        // Keys are charged like strings.
        let keys: serde_json::Map<String, Value> = (0..5)
            .map(|i| (format!("{i}{}", "k".repeat(60_000)), json!(1)))
            .collect();
        let cells = cells_of(&[row_with(&Value::Object(keys).to_string())]);
        assert!(cells[0] == Cell::TooLarge);
    }

    #[test]
    fn a_cut_deep_inside_nested_containers_skips_the_rest_and_the_next_row_reads_fine() {
        let deep = format!(
            r#"{{"a": [1, [2, {{"b": {}, "c": [3]}}, 4], 5], "d": {{"e": 6}}}}"#,
            zeros(MAX_CELL_BYTES / ELEMENT_COST)
        );
        let small = r#"{"a": [1, [2, {"b": [0], "c": [3]}, 4], 5], "d": {"e": 6}}"#;
        let cells = cells_of(&[row_with(&deep), row_with(small), row_with("[]")]);
        assert_eq!(cells[0], Cell::TooLarge);
        assert_eq!(cells[1], Cell::Value(json!("next")));
        assert_eq!(
            cells[2],
            Cell::Value(serde_json::from_str(small).unwrap()),
            "the next row's structured value is whole, in order"
        );
        assert_eq!(cells[4], Cell::Value(json!([])));
    }

    #[test]
    fn a_string_the_filter_may_have_cut_makes_its_value_too_large() {
        let at_cap = format!(r#"["{}"]"#, "x".repeat(cap::MAX_STRING_BYTES));
        let below = format!(r#"["{}"]"#, "x".repeat(cap::MAX_STRING_BYTES - 1));
        let cut_key = format!(r#"{{"{}": 1}}"#, "k".repeat(cap::MAX_STRING_BYTES));
        let cells = cells_of(&[row_with(&at_cap), row_with(&below), row_with(&cut_key)]);
        assert_eq!(cells[0], Cell::TooLarge, "never sent cut");
        assert!(matches!(&cells[2], Cell::Value(Value::Array(a)) if a.len() == 1));
        assert_eq!(cells[4], Cell::TooLarge);
        // A plain string cell is the mapping's to judge (cut far above what it keeps).
        assert!(
            matches!(&cells_of(&[row_with(&format!(r#""{}""#, "x".repeat(cap::MAX_STRING_BYTES)))])[0],
            Cell::Value(Value::String(s)) if s.len() == cap::MAX_STRING_BYTES)
        );
    }

    #[test]
    fn marked_numbers_inside_structured_values_become_numbers_again() {
        let cells = cells_of(&[row_with(r#"["\u0000#1.5", {"n": "\u0000#7"}, "\u0000#x"]"#)]);
        assert_eq!(cells[0], Cell::Value(json!([1.5, {"n": 7}, "\u{0}#x"])));
    }

    #[test]
    fn fields_keep_names_and_string_tags_and_skip_the_rest() {
        let body = json!({"fields": {
            "measures": [{"name": "o.count", "sql": "x".repeat(100_000), "tags": [{"deep": [1, 2]}, "braze[n]", 3, null]}],
            "dimensions": [{"name": "u.id", "tags": null, "enumerations": [[1, 2], {"a": "b"}]}],
            "sorts": [{"name": "ignored"}],
            "table_calculations": null,
        }, "data": []});
        let (sink, r) = collect(&body.to_string(), &[]);
        r.expect("parses");
        let fields = sink.seen_fields.unwrap();
        assert_eq!(
            fields.all,
            [
                Field {
                    name: "u.id".into(),
                    tags: vec![]
                },
                Field {
                    name: "o.count".into(),
                    tags: vec!["braze[n]".into()]
                },
            ],
            "dimensions before measures, whatever the order in the body"
        );
        let (_, r) = collect(r#"{"fields": {"dimensions": [], "dimensions": []}}"#, &[]);
        assert!(matches!(r, Err(DetailError::Syntax(_))), "{r:?}");
    }

    #[test]
    fn a_look_with_too_many_fields_or_tags_is_a_clear_error() {
        let many: Vec<Value> = (0..=MAX_FIELDS)
            .map(|i| json!({"name": format!("v.f{i}")}))
            .collect();
        let (fit, over) = (&many[..MAX_FIELDS], &many[..]);
        let body = |list: &[Value]| {
            json!({"fields": {"dimensions": list[..list.len() / 2], "measures": list[list.len() / 2..]}, "data": []})
                .to_string()
        };
        let (sink, r) = collect(&body(fit), &[]);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(sink.seen_fields.unwrap().all.len(), MAX_FIELDS);
        let (sink, r) = collect(&body(over), &[]);
        assert_eq!(
            r.unwrap_err().to_string(),
            "the result lists more than 10000 fields"
        );
        assert!(sink.seen_fields.is_none());

        let tag = "t".repeat(60_000);
        let tags = vec![tag; MAX_FIELDS_BYTES / 60_000 + 1];
        let body = json!({"fields": {"dimensions": [{"name": "u.id", "tags": tags}]}, "data": []});
        let (_, r) = collect(&body.to_string(), &[]);
        assert_eq!(
            r.unwrap_err().to_string(),
            "the result's field names and tags take more than 1 MiB"
        );
        // Empty tags are not free.
        let empty = vec![""; MAX_FIELDS_BYTES / ELEMENT_COST + 1];
        let body = json!({"fields": {"dimensions": [{"name": "u.id", "tags": empty}]}, "data": []});
        let (_, r) = collect(&body.to_string(), &[]);
        assert_eq!(
            r.unwrap_err().to_string(),
            "the result's field names and tags take more than 1 MiB"
        );
    }

    #[test]
    fn pivots_are_refused_at_their_first_entry_without_reading_on() {
        let body =
            r#"{"fields": {"dimensions": [{"name": "u.id"}]}, "pivots": [{"key": "a"}, not json"#;
        let (_, r) = collect(body, &["u.id"]);
        assert!(
            matches!(&r, Err(DetailError::Pivoted(m)) if m == "the result has pivot columns"),
            "{r:?}"
        );
        for empty in ["[]", "null", "{}", "\"x\""] {
            let body = format!(r#"{{"fields": {{}}, "pivots": {empty}, "data": []}}"#);
            assert!(collect(&body, &[]).1.is_ok(), "{empty}");
        }
    }

    #[test]
    fn a_long_errors_array_is_counted_not_kept() {
        let entries = vec![r#"{"message": "e", "sql": [1, {"a": 2}]}"#; 100_000].join(",");
        let body = format!(r#"{{"fields": {{}}, "data": [], "errors": [["x"], 7, {entries}]}}"#);
        let (_, r) = collect(&body, &[]);
        assert_eq!(
            r.unwrap_err().to_string(),
            "an error without a message; an error without a message; e; and 99999 more errors"
        );
        let (_, r) = collect(
            r#"{"fields": {}, "data": [], "errors": {"message": "not a list"}}"#,
            &[],
        );
        assert!(r.is_ok(), "{r:?}");
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
