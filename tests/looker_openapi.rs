//! Every Looker call the client makes, checked against Looker's own OpenAPI 3 spec of API
//! 4.0 (`tests/data/looker-4.0.oas.json`, a copy of `shared/specs/looker-4.0.oas.json`).

mod support;

use braze_export_operator::sandbox::{Generator, Look};
use serde_json::Value;
use support::*;

fn spec() -> Value {
    serde_json::from_str(include_str!("data/looker-4.0.oas.json")).expect("the OpenAPI spec parses")
}

/// The spec's path template matching a concrete path (`/looks/42/run/json_detail`).
fn template_for<'a>(spec: &'a Value, path: &str) -> Option<(&'a str, Vec<(String, String)>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    spec["paths"].as_object()?.keys().find_map(|t| {
        let tparts: Vec<&str> = t.trim_matches('/').split('/').collect();
        if tparts.len() != parts.len() {
            return None;
        }
        let mut vars = Vec::new();
        for (tp, p) in tparts.iter().zip(&parts) {
            match tp.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                Some(var) => vars.push((var.to_owned(), (*p).to_owned())),
                None if tp == p => {}
                None => return None,
            }
        }
        Some((t.as_str(), vars))
    })
}

fn check_value(name: &str, schema: &Value, value: &str) {
    match schema["type"].as_str() {
        Some("boolean") => assert!(
            value == "true" || value == "false",
            "{name}={value} is not a boolean"
        ),
        Some("integer") => assert!(
            value.parse::<i64>().is_ok(),
            "{name}={value} is not an integer"
        ),
        Some("string") | None => {}
        Some(other) => panic!("{name}: unexpected type {other}"),
    }
}

#[tokio::test]
async fn every_looker_call_matches_the_openapi_spec() {
    let spec = spec();
    let base = spec["servers"][0]["url"].as_str().unwrap();
    assert!(
        base.ends_with("/api/4.0"),
        "the spec's paths are relative to /api/4.0"
    );

    let w = World::start().await;
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    w.looker.expire_next_tokens_after(std::time::Duration::ZERO);
    w.run(&w.yaml("42", "", "")).await;
    w.run(&w.yaml_looker("42", "results: All", "", "")).await;
    // `removal: Remove` with `results: Table` reads the Look's row limit first.
    w.looker.expire_next_tokens_after(std::time::Duration::ZERO);
    let opts =
        braze_export_operator::export::RunOptions::new(braze_export_operator::export::Trigger::Cli);
    let synced = w
        .sync(&w.yaml("42", "removal: Remove", ""), None, opts)
        .await;
    assert_eq!(synced.report.counts.sent, 10, "{:#?}", synced.report);
    let requests = w.looker.requests();
    assert_eq!(
        requests.len(),
        11,
        "login, run (401), login, run, then login, run with limit=-1, then login, look (401), login, look, run"
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.path == "/api/4.0/looks/42")
            .count(),
        2
    );

    let mut checked_params = std::collections::BTreeSet::new();
    for r in &requests {
        let path = r
            .path
            .strip_prefix("/api/4.0")
            .expect("every call is under /api/4.0");
        let (template, vars) =
            template_for(&spec, path).unwrap_or_else(|| panic!("{path} is not in the spec"));
        let op = &spec["paths"][template][r.method.to_ascii_lowercase()];
        assert!(op.is_object(), "{} {template} is not in the spec", r.method);
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let param = |name: &str, place: &str| {
            params
                .iter()
                .find(|p| p["name"] == name && p["in"] == place)
                .cloned()
                .unwrap_or_else(|| panic!("{template} has no {place} parameter {name}"))
        };
        for (name, value) in &vars {
            check_value(name, &param(name, "path")["schema"], value);
        }
        for (name, value) in &r.query {
            check_value(name, &param(name, "query")["schema"], value);
            checked_params.insert(name.clone());
        }
        if template == "/login" {
            assert!(op["requestBody"]["content"]["application/x-www-form-urlencoded"].is_object());
            assert_eq!(
                r.content_type.as_deref(),
                Some("application/x-www-form-urlencoded")
            );
            let description = op["description"].as_str().unwrap();
            assert!(
                description.contains("Pass 'client_id' and 'client_secret' as body parameters"),
                "{description}"
            );
            for (name, _) in &r.form {
                param(name, "query");
            }
            assert!(
                r.query.is_empty(),
                "credentials go in the body, not the deprecated query parameters"
            );
        }
        if template == "/looks/{look_id}" {
            assert_eq!(r.method, "GET");
            assert_eq!(op["operationId"], "look");
            let schema = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .unwrap();
            assert_eq!(schema, "#/components/schemas/LookWithQuery");
            let query =
                spec["components"]["schemas"]["LookWithQuery"]["properties"]["query"]["$ref"]
                    .as_str()
                    .unwrap();
            assert_eq!(query, "#/components/schemas/Query");
            let limit = &spec["components"]["schemas"]["Query"]["properties"]["limit"];
            assert_eq!(limit["type"], "string", "Query.limit is a string");
            assert_eq!(r.query, [("fields".into(), "query(limit)".into())]);
        }
        if template == "/looks/{look_id}/run/{result_format}" {
            let formats = param("result_format", "path")["description"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
                + op["description"].as_str().unwrap_or_default();
            assert!(
                formats.contains("json_detail"),
                "json_detail is a documented result format"
            );
        }
    }
    assert_eq!(
        checked_params.into_iter().collect::<Vec<_>>(),
        [
            "apply_formatting",
            "apply_vis",
            "fields",
            "generate_drill_links",
            "limit"
        ],
        "the query parameters the client sends"
    );
}
