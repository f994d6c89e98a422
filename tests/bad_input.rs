//! Bad input never panics: thousands of corrupted Looker bodies, Braze answers and YAML specs
//! each end in an error (or a result), never a crash.

use braze_export_operator::braze::client::{Verdict, classify};
use braze_export_operator::commands::load::load_export;
use braze_export_operator::export::ExportPlan;
use braze_export_operator::looker::json_detail::{self, Cell, Fields, RowSink, Stop};
use reqwest::StatusCode;

struct Keep;

impl RowSink for Keep {
    fn fields(&mut self, fields: &Fields) -> Result<Vec<String>, Stop> {
        Ok(fields.all.iter().map(|f| f.name.clone()).collect())
    }
    fn row(&mut self, _: u64, _: &mut [Cell]) -> Result<(), Stop> {
        Ok(())
    }
}

/// `base` with a few bytes replaced, removed or duplicated, or cut short.
fn mutate(rng: &mut fastrand::Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.usize(1..6) {
        if v.is_empty() {
            break;
        }
        let i = rng.usize(..v.len());
        match rng.u8(..4) {
            0 => v[i] = b"{}[]\",:0-9aeE\\nul \x00\xff"[rng.usize(..20)],
            1 => {
                v.remove(i);
            }
            2 => {
                let b = v[i];
                v.insert(i, b);
            }
            _ => v.truncate(i),
        }
    }
    v
}

#[test]
fn corrupted_json_detail_bodies_give_errors_not_panics() {
    let base = include_bytes!("data/looker-json-detail-example.json");
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let body = mutate(&mut rng, base);
        match json_detail::parse(body.as_slice(), &mut Keep) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                err += 1;
            }
        }
    }
    assert!(
        err > 2000 && ok > 0,
        "mutations exercised both paths: {ok} ok, {err} errors"
    );
}

#[test]
fn parse_errors_never_quote_the_body() {
    // Any service may answer in Looker's place: an error may say where parsing failed, never
    // what the text there was.
    let base = include_str!("data/looker-json-detail-example.json");
    let spots: Vec<usize> = base
        .char_indices()
        .filter(|(_, c)| matches!(c, ':' | '[' | ','))
        .map(|(i, _)| i + 1)
        .collect();
    let marks = [
        r#""tok-LEAK""#,
        r#""tok-LEAK", "#,
        "tok-LEAK",
        r#"{"tok-LEAK": 1}"#,
        r#"["tok-LEAK"]"#,
        "<b>tok-LEAK</b>",
        r#""tok-LEAK, expected a sequence at line 1 column 2""#,
    ];
    let mut rng = fastrand::Rng::with_seed(13);
    let mut errors = 0;
    for _ in 0..3000 {
        let at = spots[rng.usize(..spots.len())];
        let mark = marks[rng.usize(..marks.len())];
        // Either insert the mark or let it replace what follows, up to the next comma.
        let end = if rng.bool() {
            at
        } else {
            at + base[at..].find(',').unwrap_or(0)
        };
        let body = format!("{}{mark}{}", &base[..at], &base[end..]);
        if let Err(e) = json_detail::parse(body.as_bytes(), &mut Keep) {
            let message = e.to_string();
            assert!(!message.contains("tok-LEAK"), "{message}");
            errors += 1;
        }
    }
    assert!(errors > 1000, "{errors} errors");
}

#[test]
fn corrupted_braze_answers_are_classified() {
    let url = "https://rest.iad-01.braze.com/users/track".parse().unwrap();
    let base = br#"{"message":"success","errors":[{"type":"x","input_array":"attributes","index":1},{"type":"y","input_array":"attributes","index":2}]}"#;
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..3000 {
        let body = mutate(&mut rng, base);
        let status = StatusCode::from_u16(
            [200, 201, 400, 401, 403, 404, 413, 429, 500, 503, 418][rng.usize(..11)],
        )
        .unwrap();
        let verdict = classify(&url, status, &body, 3);
        if let Verdict::Accepted(rejected) | Verdict::RejectSome(rejected) = verdict {
            assert!(
                rejected.iter().all(|(i, _)| *i < 3),
                "indexes stay inside the batch"
            );
        }
    }
}

#[test]
fn corrupted_specs_give_messages_not_panics() {
    let base = include_str!("../examples/newsletter-user-alias.yaml").as_bytes();
    let mut rng = fastrand::Rng::with_seed(3);
    let mut refused = 0;
    for _ in 0..2000 {
        let text = String::from_utf8_lossy(&mutate(&mut rng, base)).into_owned();
        match load_export(&text) {
            Err(message) => {
                assert!(!message.is_empty());
                refused += 1;
            }
            Ok(export) => {
                if let Err(errors) = ExportPlan::new("fuzz", &export.spec) {
                    assert!(
                        errors
                            .iter()
                            .all(|e| e.field.starts_with("spec.") && !e.message.is_empty()),
                        "{errors:?}"
                    );
                }
            }
        }
    }
    assert!(refused > 100, "{refused}");
}
