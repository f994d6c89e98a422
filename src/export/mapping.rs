//! Pure mapping from Looker rows to Braze attributes objects: which columns matter (the
//! `braze_id` tag or `idField`, `braze[NAME]` tags), identifier rules, the removal object,
//! and deduplication. Why a row is refused ([`Invalid`]) is a report reason and lives in
//! [`super::report`], re-exported here.

use std::borrow::Cow;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

pub use super::report::{Invalid, MAX_ATTRIBUTE_CHARS};
use crate::audience::Flag;
use crate::looker::json_detail::{Cell, Fields};
use crate::spec::{IdentifierKind, RESERVED_ATTRIBUTES};
use crate::text::{clean, name_list};

// The report names the parser's budgets without importing them: they must agree.
const _: () = assert!(
    super::report::CELL_BUDGET_KIB << 10 == crate::looker::json_detail::MAX_CELL_BYTES
        && super::report::ROW_BUDGET_MIB << 20 == crate::looker::json_detail::MAX_ROW_BYTES
);

/// The tag that marks the identifier field.
pub const ID_TAG: &str = "braze_id";
/// Braze's limit for identifiers, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 987;

/// The columns an export reads: the identifier first, then each attribute's field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    /// Field names to keep from each row; index 0 is the identifier field.
    pub captures: Vec<String>,
    /// Attribute name and the index of its field in `captures`, in field order.
    pub attributes: Vec<(String, usize)>,
}

impl Columns {
    /// The identifier field's name.
    pub fn id_field(&self) -> &str {
        &self.captures[0]
    }
}

/// Why a Look's fields cannot be exported.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ColumnError {
    /// No field is tagged `braze_id` and `idField` is not set.
    #[error(
        "no field of the Look is tagged braze_id: tag the user-id dimension braze_id in LookML, or set spec.looker.idField"
    )]
    NoIdField,
    /// Several fields are tagged `braze_id`.
    #[error("fields {} are all tagged braze_id: keep the tag on one, or set spec.looker.idField", name_list(.0, 5))]
    AmbiguousIdField(Vec<String>),
    /// `idField` names a field the Look does not have.
    #[error("spec.looker.idField {} is not a field of the Look (its fields: {})", clean(.field, 80), name_list(.available, 20))]
    IdFieldNotFound {
        field: String,
        available: Vec<String>,
    },
    /// A `braze[NAME]` tag would overwrite the identifier, the update-only flag or the flag.
    #[error(
        "field {} is tagged braze[{}], but {} is reserved (identifier keys, _update_existing_only and the export attribute)",
        clean(.field, 80), clean(.name, 80), clean(.name, 80)
    )]
    ReservedAttribute { field: String, name: String },
    /// Two fields write the same attribute.
    #[error("fields {} and {} are both tagged braze[{}]", clean(.first, 80), clean(.second, 80), clean(.name, 80))]
    DuplicateAttribute {
        name: String,
        first: String,
        second: String,
    },
}

impl ColumnError {
    /// Short CamelCase reason for conditions, metrics and report errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoIdField => "NoIdField",
            Self::AmbiguousIdField(_) => "AmbiguousIdField",
            Self::IdFieldNotFound { .. } => "IdFieldNotFound",
            Self::ReservedAttribute { .. } => "ReservedAttribute",
            Self::DuplicateAttribute { .. } => "DuplicateAttribute",
        }
    }
}

/// The attribute name of a `braze[NAME]` tag: exactly that form, NAME non-empty and without
/// brackets. Anything else is not an attribute tag.
pub fn attribute_tag(tag: &str) -> Option<&str> {
    let name = tag.strip_prefix("braze[")?.strip_suffix(']')?;
    (!name.is_empty() && !name.contains(['[', ']'])).then_some(name)
}

/// Tags that look like attribute tags but are not exactly `braze[NAME]` (worth a warning).
pub fn near_miss_tag(tag: &str) -> bool {
    attribute_tag(tag).is_none() && tag.to_ascii_lowercase().starts_with("braze[")
}

/// Picks the identifier and attribute columns from the Look's fields. The identifier is
/// resolved first: it is capture 0, which the attributes may share.
pub fn resolve_columns(
    fields: &Fields,
    id_field: Option<&str>,
    export_attribute: &str,
) -> Result<Columns, ColumnError> {
    let mut captures = vec![id_column(fields, id_field)?];
    let attributes = attribute_columns(fields, export_attribute, &mut captures)?;
    Ok(Columns {
        captures,
        attributes,
    })
}

/// The identifier field: `idField` when set, else the one field tagged `braze_id`.
fn id_column(fields: &Fields, id_field: Option<&str>) -> Result<String, ColumnError> {
    if let Some(name) = id_field {
        if !fields.all.iter().any(|f| f.name == name) {
            return Err(ColumnError::IdFieldNotFound {
                field: name.to_owned(),
                available: fields.all.iter().map(|f| f.name.clone()).collect(),
            });
        }
        return Ok(name.to_owned());
    }
    let tagged: Vec<String> = fields
        .all
        .iter()
        .filter(|f| f.tags.iter().any(|t| t == ID_TAG))
        .map(|f| f.name.clone())
        .collect();
    match tagged.len() {
        0 => Err(ColumnError::NoIdField),
        1 => Ok(tagged.into_iter().next().expect("one element")),
        _ => Err(ColumnError::AmbiguousIdField(tagged)),
    }
}

/// Each `braze[NAME]` tag's attribute and the index of its field in `captures` (added to it
/// when not captured yet), in field order; reserved and repeated names are refused.
fn attribute_columns(
    fields: &Fields,
    export_attribute: &str,
    captures: &mut Vec<String>,
) -> Result<Vec<(String, usize)>, ColumnError> {
    let mut attributes: Vec<(String, usize)> = Vec::new();
    for field in &fields.all {
        for name in field.tags.iter().filter_map(|t| attribute_tag(t)) {
            if RESERVED_ATTRIBUTES.contains(&name) || name == export_attribute {
                return Err(ColumnError::ReservedAttribute {
                    field: field.name.clone(),
                    name: name.to_owned(),
                });
            }
            if let Some((_, i)) = attributes.iter().find(|(n, _)| n == name) {
                return Err(ColumnError::DuplicateAttribute {
                    name: name.to_owned(),
                    first: captures[*i].clone(),
                    second: field.name.clone(),
                });
            }
            let index = match captures.iter().position(|c| *c == field.name) {
                Some(i) => i,
                None => {
                    captures.push(field.name.clone());
                    captures.len() - 1
                }
            };
            attributes.push((name.to_owned(), index));
        }
    }
    Ok(attributes)
}

/// What every object of an export shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectShape {
    /// Identifier kind.
    pub identifier: IdentifierKind,
    /// Alias label (for `user_alias`).
    pub alias_label: String,
    /// `_update_existing_only`.
    pub update_existing_only: bool,
    /// The array attribute.
    pub attribute: String,
    /// The value added to it.
    pub export_name: String,
}

/// The identifier as Braze gets it: strings as they are, numbers as the decimal digits Looker
/// sent (`42.0` and `4.2e1` as `42`); fractions and overflowing numbers are invalid.
pub fn identifier(cell: &Cell) -> Result<Cow<'_, str>, Invalid> {
    let id = match cell {
        Cell::Missing => return Err(Invalid::MissingField(0)),
        Cell::Pivoted | Cell::Malformed => return Err(Invalid::MalformedCell(0)),
        Cell::TooLarge => return Err(Invalid::ValueTooLarge(0)),
        Cell::Value(Value::Null) => return Err(Invalid::NullIdentifier),
        Cell::Value(Value::String(s)) if s.trim().is_empty() => {
            return Err(Invalid::EmptyIdentifier);
        }
        Cell::Value(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Cell::Number(text) => Cow::Owned(integral_digits(text)?),
        Cell::Value(Value::Number(n)) => Cow::Owned(integral_digits(&n.to_string())?),
        Cell::Value(_) => return Err(Invalid::InvalidIdentifier),
    };
    if id.len() > MAX_IDENTIFIER_BYTES {
        return Err(Invalid::IdentifierTooLong);
    }
    Ok(id)
}

/// The whole number a JSON number's text denotes, as plain digits, computed on the text so
/// no digit is lost to a float.
pub fn integral_digits(text: &str) -> Result<String, Invalid> {
    let malformed = Invalid::InvalidIdentifier;
    if text.parse::<f64>().map_err(|_| malformed)?.is_infinite() {
        return Err(Invalid::NonFiniteIdentifier);
    }
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().map_err(|_| malformed)?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return Err(malformed);
    }
    if int.bytes().chain(frac.bytes()).all(|b| b == b'0') {
        return Ok("0".into());
    }
    // Digits before the decimal point once the exponent is applied (a nonzero number that
    // passed the f64 check has a bounded exponent; saturate anyway).
    let point = (int.len() as i64).saturating_add(exponent);
    let digits = format!("{int}{frac}");
    let split = point.clamp(0, digits.len() as i64) as usize;
    let (whole, fraction) = digits.split_at(split);
    if fraction.bytes().any(|b| b != b'0') {
        return Err(Invalid::NonIntegralIdentifier);
    }
    let padding = (point.max(0) as usize).saturating_sub(whole.len());
    if whole.len().saturating_add(padding) > MAX_IDENTIFIER_BYTES {
        return Err(Invalid::IdentifierTooLong);
    }
    let whole = whole.trim_start_matches('0');
    if whole.is_empty() {
        return Ok("0".into());
    }
    let sign = if negative { "-" } else { "" };
    Ok(format!("{sign}{whole}{}", "0".repeat(padding)))
}

/// One Braze attributes object, borrowing the row it came from.
#[derive(Debug)]
pub struct BrazeObject<'a> {
    shape: &'a ObjectShape,
    columns: &'a Columns,
    cells: &'a [Cell],
    /// The identifier, as sent.
    pub id: Cow<'a, str>,
}

/// Maps one row's kept cells (in `columns.captures` order) to an object, or says why not.
pub fn map_row<'a>(
    columns: &'a Columns,
    shape: &'a ObjectShape,
    cells: &'a [Cell],
) -> Result<BrazeObject<'a>, Invalid> {
    let id = identifier(&cells[0])?;
    for &(_, index) in &columns.attributes {
        match cells[index] {
            Cell::Missing => return Err(Invalid::MissingField(index)),
            Cell::Pivoted | Cell::Malformed => return Err(Invalid::MalformedCell(index)),
            Cell::TooLarge => return Err(Invalid::ValueTooLarge(index)),
            Cell::Value(_) | Cell::Number(_) => {}
        }
    }
    Ok(BrazeObject {
        shape,
        columns,
        cells,
        id,
    })
}

impl Serialize for BrazeObject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match self.shape.identifier {
            IdentifierKind::UserAlias => map.serialize_entry(
                "user_alias",
                &Alias {
                    name: &self.id,
                    label: &self.shape.alias_label,
                },
            )?,
            kind => map.serialize_entry(kind.key(), &self.id)?,
        }
        map.serialize_entry("_update_existing_only", &self.shape.update_existing_only)?;
        for (name, index) in &self.columns.attributes {
            match &self.cells[*index] {
                Cell::Value(Value::String(v)) if too_long(v) => {}
                Cell::Value(v) if !v.is_null() => map.serialize_entry(name, v)?,
                // A numeric attribute is a double in Braze: the float nearest Looker's text.
                Cell::Number(text) => match text.parse::<serde_json::Number>() {
                    Ok(n) => map.serialize_entry(name, &n)?,
                    Err(_) => map.serialize_entry(name, text)?,
                },
                _ => {}
            }
        }
        map.serialize_entry(
            &self.shape.attribute,
            &Add([self.shape.export_name.as_str()]),
        )?;
        map.end()
    }
}

impl BrazeObject<'_> {
    /// Attributes left out because their text is longer than Braze keeps: the user is
    /// flagged without them, and the report names their rows.
    pub fn too_long_attributes(&self) -> impl Iterator<Item = &str> {
        self.columns
            .attributes
            .iter()
            .filter(
                |(_, i)| matches!(&self.cells[*i], Cell::Value(Value::String(v)) if too_long(v)),
            )
            .map(|(name, _)| name.as_str())
    }
}

fn too_long(text: &str) -> bool {
    text.len() > MAX_ATTRIBUTE_CHARS && text.chars().nth(MAX_ATTRIBUTE_CHARS).is_some()
}

/// The object that takes the flag off a user who left the Look:
/// `{"<identifier>": …, "_update_existing_only": true, "<attribute>": {"remove": ["<exportName>"]}}`.
/// Always for existing users only: a removal must never create one.
#[derive(Debug)]
pub struct RemovalObject<'a> {
    /// Identifier kind.
    pub identifier: IdentifierKind,
    /// Alias label (for `user_alias`).
    pub alias_label: &'a str,
    /// The flags removed (sorted by attribute: one entry per attribute).
    pub flags: &'a [Flag],
    /// The identifier.
    pub id: &'a str,
}

impl Serialize for RemovalObject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3))?;
        match self.identifier {
            IdentifierKind::UserAlias => map.serialize_entry(
                "user_alias",
                &Alias {
                    name: self.id,
                    label: self.alias_label,
                },
            )?,
            kind => map.serialize_entry(kind.key(), self.id)?,
        }
        map.serialize_entry("_update_existing_only", &true)?;
        for same in self.flags.chunk_by(|a, b| a.attribute == b.attribute) {
            map.serialize_entry(&same[0].attribute, &Remove(same))?;
        }
        map.end()
    }
}

/// `{"remove": [values]}` for flags of one attribute.
struct Remove<'a>(&'a [Flag]);

impl Serialize for Remove<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = self.0.iter().map(|f| f.export_name.as_str()).collect();
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("remove", &names)?;
        map.end()
    }
}

#[derive(Serialize)]
struct Alias<'a> {
    #[serde(rename = "alias_name")]
    name: &'a str,
    #[serde(rename = "alias_label")]
    label: &'a str,
}

#[derive(Serialize)]
struct Add<'a>(#[serde(serialize_with = "add")] [&'a str; 1]);

fn add<S: Serializer>(values: &[&str; 1], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(1))?;
    map.serialize_entry("add", values)?;
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::looker::json_detail::Field;
    use serde_json::json;

    fn field(name: &str, tags: &[&str]) -> Field {
        Field {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn fields(list: Vec<Field>) -> Fields {
        Fields {
            all: list,
            pivots: vec![],
        }
    }

    fn shape(identifier: IdentifierKind) -> ObjectShape {
        ObjectShape {
            identifier,
            alias_label: "looker".into(),
            update_existing_only: true,
            attribute: "looker_export".into(),
            export_name: "CHURN".into(),
        }
    }

    fn v(x: Value) -> Cell {
        Cell::Value(x)
    }

    #[test]
    fn attribute_tags_are_exact() {
        assert_eq!(attribute_tag("braze[first_name]"), Some("first_name"));
        assert_eq!(attribute_tag("braze[First Name]"), Some("First Name"));
        for not in [
            "braze[]",
            "BRAZE[x]",
            "braze[a][b]",
            "xbraze[foo]bar",
            "braze_id",
            "braze[foo",
            "braze[x] ",
        ] {
            assert_eq!(attribute_tag(not), None, "{not}");
        }
        assert!(
            near_miss_tag("BRAZE[x]") && near_miss_tag("braze[]") && !near_miss_tag("braze_id")
        );
    }

    #[test]
    fn resolves_id_and_attributes_in_field_order() {
        let f = fields(vec![
            field("users.email", &["braze[email]"]),
            field("users.id", &["braze_id", "braze[looker_id]"]),
            field("users.ltv", &["braze[ltv]", "other"]),
            field("users.count", &[]),
        ]);
        let c = resolve_columns(&f, None, "looker_export").unwrap();
        assert_eq!(c.captures, ["users.id", "users.email", "users.ltv"]);
        assert_eq!(
            c.attributes,
            [
                ("email".into(), 1),
                ("looker_id".into(), 0),
                ("ltv".into(), 2)
            ]
        );
        let by_field = resolve_columns(&f, Some("users.count"), "looker_export").unwrap();
        assert_eq!(by_field.id_field(), "users.count");
    }

    #[test]
    fn column_errors_name_the_fields() {
        let none = fields(vec![field("a", &["braze_ID"])]);
        assert_eq!(
            resolve_columns(&none, None, "x"),
            Err(ColumnError::NoIdField)
        );
        let two = fields(vec![field("a", &["braze_id"]), field("b", &["braze_id"])]);
        assert_eq!(
            resolve_columns(&two, None, "x").unwrap_err().to_string(),
            "fields a, b are all tagged braze_id: keep the tag on one, or set spec.looker.idField"
        );
        let e = resolve_columns(&two, Some("c"), "x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.looker.idField c is not a field of the Look (its fields: a, b)"
        );
        for reserved in [
            "external_id",
            "braze_id",
            "user_alias",
            "_update_existing_only",
            "flags",
        ] {
            let f = fields(vec![
                field("a", &["braze_id"]),
                field("b", &[&format!("braze[{reserved}]")]),
            ]);
            let e = resolve_columns(&f, None, "flags").unwrap_err();
            assert_eq!(e.reason(), "ReservedAttribute");
            assert!(e.to_string().contains(&format!("braze[{reserved}]")), "{e}");
        }
        let dup = fields(vec![
            field("a", &["braze_id", "braze[x]"]),
            field("b", &["braze[x]"]),
        ]);
        assert_eq!(
            resolve_columns(&dup, None, "f").unwrap_err().to_string(),
            "fields a and b are both tagged braze[x]"
        );
    }

    #[test]
    fn identifiers_follow_the_data_rules() {
        assert_eq!(identifier(&v(json!("u1 "))).unwrap(), "u1 ");
        assert_eq!(identifier(&v(json!(12345))).unwrap(), "12345");
        assert_eq!(identifier(&v(json!(-7))).unwrap(), "-7");
        assert_eq!(identifier(&v(json!(42.0))).unwrap(), "42");
        assert_eq!(
            identifier(&v(json!(1.5))),
            Err(Invalid::NonIntegralIdentifier)
        );
        assert_eq!(identifier(&v(json!(null))), Err(Invalid::NullIdentifier));
        assert_eq!(identifier(&v(json!(""))), Err(Invalid::EmptyIdentifier));
        assert_eq!(identifier(&v(json!("  "))), Err(Invalid::EmptyIdentifier));
        assert_eq!(identifier(&v(json!(true))), Err(Invalid::InvalidIdentifier));
        assert_eq!(
            identifier(&v(json!({"a": 1}))),
            Err(Invalid::InvalidIdentifier)
        );
        assert_eq!(identifier(&v(json!([1]))), Err(Invalid::InvalidIdentifier));
        assert_eq!(identifier(&Cell::Missing), Err(Invalid::MissingField(0)));
        assert_eq!(identifier(&Cell::Malformed), Err(Invalid::MalformedCell(0)));
        assert_eq!(identifier(&Cell::TooLarge), Err(Invalid::ValueTooLarge(0)));
        assert!(identifier(&v(json!("é".repeat(493)))).is_ok(), "986 bytes");
        assert_eq!(
            identifier(&v(json!("x".repeat(988)))),
            Err(Invalid::IdentifierTooLong)
        );
    }

    #[test]
    fn numeric_identifiers_keep_every_digit() {
        let n = |t: &str| identifier(&Cell::Number(t.into())).map(|c| c.into_owned());
        assert_eq!(n("123456789012345678901").unwrap(), "123456789012345678901");
        assert_eq!(n("-98765432109876543210").unwrap(), "-98765432109876543210");
        assert_eq!(n("1.2345678901234567e20").unwrap(), "123456789012345670000");
        assert_eq!(n("42.000").unwrap(), "42");
        assert_eq!(n("4.2E1").unwrap(), "42");
        assert_eq!(n("1e3").unwrap(), "1000");
        assert_eq!(n("0").unwrap(), "0");
        assert_eq!(n("-0.0").unwrap(), "0");
        assert_eq!(n("0.5e1").unwrap(), "5");
        assert_eq!(n("1.5"), Err(Invalid::NonIntegralIdentifier));
        assert_eq!(n("1e-3"), Err(Invalid::NonIntegralIdentifier));
        assert_eq!(n("12.5e0"), Err(Invalid::NonIntegralIdentifier));
        assert_eq!(n("1e400"), Err(Invalid::NonFiniteIdentifier));
        assert_eq!(n(&"9".repeat(400)), Err(Invalid::NonFiniteIdentifier));
        assert_eq!(n("1e300").unwrap().len(), 301);
        assert_eq!(n("x"), Err(Invalid::InvalidIdentifier));
        assert_eq!(n("0e9223372036854775807").unwrap(), "0");
        assert_eq!(
            n("1e-9223372036854775808"),
            Err(Invalid::NonIntegralIdentifier)
        );
    }

    #[test]
    fn numbers_go_out_as_sent_and_long_text_is_left_out() {
        let cells = [
            Cell::Number("123456789012345678901".into()),
            v(json!("x".repeat(256))),
            Cell::Number("2.5".into()),
        ];
        let c = columns();
        let s = shape(IdentifierKind::ExternalId);
        let o = map_row(&c, &s, &cells).unwrap();
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"external_id":"123456789012345678901","_update_existing_only":true,"vip":2.5,"looker_export":{"add":["CHURN"]}}"#
        );
        assert_eq!(o.too_long_attributes().collect::<Vec<_>>(), ["first_name"]);
        let fits = [v(json!("u")), v(json!("é".repeat(255))), v(json!(null))];
        let o = map_row(&c, &s, &fits).unwrap();
        assert_eq!(o.too_long_attributes().count(), 0);
    }

    fn columns() -> Columns {
        resolve_columns(
            &fields(vec![
                field("u.id", &["braze_id"]),
                field("u.name", &["braze[first_name]"]),
                field("u.vip", &["braze[vip]"]),
            ]),
            None,
            "looker_export",
        )
        .unwrap()
    }

    fn object(kind: IdentifierKind, cells: &[Cell]) -> Result<Value, Invalid> {
        let c = columns();
        let s = shape(kind);
        map_row(&c, &s, cells).map(|o| serde_json::to_value(&o).unwrap())
    }

    #[test]
    fn the_three_identifier_shapes_in_key_order() {
        let cells = [v(json!("u1")), v(json!("Ada")), v(json!(true))];
        let text =
            serde_json::to_string(&object(IdentifierKind::ExternalId, &cells).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"external_id":"u1","_update_existing_only":true,"first_name":"Ada","vip":true,"looker_export":{"add":["CHURN"]}}"#
        );
        let c = columns();
        let s = shape(IdentifierKind::UserAlias);
        let o = map_row(&c, &s, &cells).unwrap();
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"user_alias":{"alias_name":"u1","alias_label":"looker"},"_update_existing_only":true,"first_name":"Ada","vip":true,"looker_export":{"add":["CHURN"]}}"#
        );
        assert_eq!(
            object(IdentifierKind::BrazeId, &cells).unwrap()["braze_id"],
            "u1"
        );
    }

    #[test]
    fn null_attributes_are_left_out_and_missing_ones_invalidate() {
        let o = object(
            IdentifierKind::ExternalId,
            &[v(json!(7)), v(json!(null)), v(json!("yes"))],
        )
        .unwrap();
        assert_eq!(
            o,
            json!({"external_id": "7", "_update_existing_only": true, "vip": "yes", "looker_export": {"add": ["CHURN"]}})
        );
        assert_eq!(
            object(
                IdentifierKind::ExternalId,
                &[v(json!("u")), Cell::Missing, v(json!(1))]
            ),
            Err(Invalid::MissingField(1))
        );
        assert_eq!(
            object(
                IdentifierKind::ExternalId,
                &[v(json!("u")), v(json!(1)), Cell::Malformed]
            ),
            Err(Invalid::MalformedCell(2))
        );
        assert_eq!(
            object(
                IdentifierKind::ExternalId,
                &[v(json!("u")), Cell::TooLarge, v(json!(1))]
            ),
            Err(Invalid::ValueTooLarge(1)),
            "an oversized array or object is never sent cut"
        );
        assert_eq!(
            object(
                IdentifierKind::ExternalId,
                &[v(json!(null)), v(json!(1)), v(json!(1))]
            ),
            Err(Invalid::NullIdentifier)
        );
    }

    #[test]
    fn update_existing_only_false_is_sent() {
        let c = columns();
        let s = ObjectShape {
            update_existing_only: false,
            ..shape(IdentifierKind::ExternalId)
        };
        let cells = [v(json!("u1")), v(json!(null)), v(json!(null))];
        let o = serde_json::to_value(map_row(&c, &s, &cells).unwrap()).unwrap();
        assert_eq!(o["_update_existing_only"], false);
    }

    #[test]
    fn removal_objects_take_the_value_off_existing_users_only() {
        let flag = |attribute: &str, export_name: &str| Flag {
            attribute: attribute.into(),
            export_name: export_name.into(),
        };
        let churn = [flag("looker_export", "CHURN")];
        let r = |identifier, id| {
            serde_json::to_string(&RemovalObject {
                identifier,
                alias_label: "looker",
                flags: &churn,
                id,
            })
            .unwrap()
        };
        assert_eq!(
            r(IdentifierKind::ExternalId, "u1"),
            r#"{"external_id":"u1","_update_existing_only":true,"looker_export":{"remove":["CHURN"]}}"#
        );
        assert_eq!(
            r(IdentifierKind::UserAlias, "a\"b"),
            r#"{"user_alias":{"alias_name":"a\"b","alias_label":"looker"},"_update_existing_only":true,"looker_export":{"remove":["CHURN"]}}"#
        );
        assert!(r(IdentifierKind::BrazeId, "b1").starts_with(r#"{"braze_id":"b1","#));
        // Several flags: one entry per attribute.
        let several = [
            flag("crm", "VIP"),
            flag("looker_export", "CHURN"),
            flag("looker_export", "CHURN_V2"),
        ];
        let o = RemovalObject {
            identifier: IdentifierKind::ExternalId,
            alias_label: "",
            flags: &several,
            id: "u1",
        };
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"external_id":"u1","_update_existing_only":true,"crm":{"remove":["VIP"]},"looker_export":{"remove":["CHURN","CHURN_V2"]}}"#
        );
    }
}
