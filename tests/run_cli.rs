//! The `run` command as a user runs it: the real binary against the sandbox Looker and
//! Braze, checking exact payloads, headers, query parameters, report counts and exit codes.

mod support;

use braze_export_operator::sandbox::{Fault, Generator, Look, Rows};
use serde_json::{Value, json};
use support::*;

/// The shape of the Looker action's own test data (reference section 1.4/1.7): a `braze_id`
/// dimension, `braze[...]` attribute tags, a near-miss tag, and an untagged measure.
fn action_sample() -> Look {
    let fields = json!({
        "dimensions": [
            field("users.external_id", &["braze_id"]),
            field("users.first_name", &["braze[first_name]"]),
            field("users.field_1", &["braze[field_1]", "other_tag"]),
            field("users.city", &["BRAZE[City]"]),
        ],
        "measures": [field("users.count", &[])],
        "table_calculations": [],
        "pivots": []
    });
    let rows = vec![
        row(&[
            ("users.external_id", json!("u1 ")),
            ("users.first_name", json!("Ada")),
            ("users.field_1", json!(3)),
            ("users.city", json!("Berlin")),
            ("users.count", json!(3)),
        ]),
        row(&[
            ("users.external_id", json!("u2")),
            ("users.first_name", Value::Null),
            ("users.field_1", json!(true)),
            ("users.city", json!("Paris")),
            ("users.count", json!(1)),
        ]),
    ];
    Look::new(fields, Rows::Fixed(rows))
}

#[tokio::test]
async fn the_action_sample_sends_exact_payloads_headers_and_query() {
    let w = World::start().await;
    w.looker.add_look("42", action_sample());
    let (out, _spec) = cli_run(&w.yaml("42", "", ""), &[]).await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);

    let requests = w.braze.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        r.authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        serde_json::to_string(&r.body).unwrap(),
        concat!(
            r#"{"attributes":["#,
            r#"{"external_id":"u1 ","_update_existing_only":true,"first_name":"Ada","field_1":3,"looker_export":{"add":["LOOKER_EXPORT"]}},"#,
            r#"{"external_id":"u2","_update_existing_only":true,"field_1":true,"looker_export":{"add":["LOOKER_EXPORT"]}}"#,
            "]}"
        ),
        "identifier first, nulls left out, untagged and near-miss fields not sent, the key never in the body"
    );

    let logins = w.looker.requests_to("/login");
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].method, "POST");
    assert_eq!(
        logins[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        logins[0].form,
        [
            ("client_id".into(), CLIENT_ID.into()),
            ("client_secret".into(), CLIENT_SECRET.into())
        ]
    );
    assert!(logins[0].query.is_empty(), "credentials never in the URL");
    let runs = w.looker.requests_to("/run/json_detail");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].path, "/api/4.0/looks/42/run/json_detail");
    let q: Vec<(&str, &str)> = runs[0]
        .query
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        q,
        [
            ("apply_formatting", "false"),
            ("apply_vis", "false"),
            ("generate_drill_links", "false")
        ]
    );
    assert!(
        runs[0]
            .authorization
            .as_deref()
            .unwrap()
            .starts_with("token sandbox-token-")
    );

    let report = out.report();
    for (k, v) in [
        ("rowsRead", 2),
        ("sent", 2),
        ("duplicates", 0),
        ("invalid", 0),
        ("rejected", 0),
        ("failed", 0),
        ("skipped", 0),
        ("requests", 1),
        ("retries", 0),
        ("rateLimited", 0),
    ] {
        assert_eq!(report[k], v, "{k}");
    }
    assert_eq!(report["outcome"], "Succeeded");
    assert_eq!(report["trigger"], "Cli");
    assert_eq!(report["message"], "2 users flagged");
    assert!(
        out.stderr
            .contains("tag is not of the form braze[NAME] and is ignored"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn results_all_asks_for_every_row() {
    let w = World::start().await;
    let mut look = Look::users(120, Generator::Clean);
    look.table_limit = 100;
    w.looker.add_look("7", look);
    let (table, _s) = cli_run(&w.yaml("7", "", ""), &[]).await;
    assert_eq!(
        table.report()["rowsRead"],
        100,
        "Table: the Look's own limit"
    );
    let (all, _s) = cli_run(&w.yaml_looker("7", "results: All", "", ""), &[]).await;
    assert_eq!(all.code, 0, "{}", all.stderr);
    assert_eq!(all.report()["sent"], 120);
    let last = w.looker.requests_to("/run/json_detail").pop().unwrap();
    assert_eq!(
        last.query.last().unwrap(),
        &("limit".to_string(), "-1".to_string())
    );
}

#[tokio::test]
async fn dry_run_builds_every_batch_and_sends_nothing() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(160, Generator::Dirty));
    let dump = tempfile::NamedTempFile::new().unwrap();
    let spec = write_spec(&w.yaml("42", "", ""));
    let out = cli_spec(
        &spec,
        &[
            "--dry-run",
            "--output",
            "json",
            "--dump-payloads",
            dump.path().to_str().unwrap(),
        ],
        &["BRAZE_API_KEY"],
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(w.braze.request_count(), 0, "nothing reaches Braze");
    let report = out.report();
    assert_eq!(report["dryRun"], true);
    assert_eq!(
        (
            report["rowsRead"].as_u64(),
            report["sent"].as_u64(),
            report["duplicates"].as_u64(),
            report["invalid"].as_u64()
        ),
        (Some(160), Some(156), Some(3), Some(1))
    );
    assert_eq!(report["requests"], 0);
    let lines: Vec<Value> = std::fs::read_to_string(dump.path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sizes: Vec<usize> = lines
        .iter()
        .map(|l| l["attributes"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [75, 75, 6]);
    assert_eq!(
        lines[0]["attributes"][0],
        json!({"external_id": "user-0000001", "_update_existing_only": true, "first_name": "Grace", "looker_export": {"add": ["LOOKER_EXPORT"]}})
    );
}

#[tokio::test]
async fn dump_payloads_records_each_request_body_when_sending() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(80, Generator::Clean));
    let dump = tempfile::NamedTempFile::new().unwrap();
    let (out, _s) = cli_run(
        &w.yaml("42", "", ""),
        &["--dump-payloads", dump.path().to_str().unwrap()],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<Value> = std::fs::read_to_string(dump.path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut sent: Vec<Value> = w.braze.requests().into_iter().map(|r| r.body).collect();
    let mut dumped = lines.clone();
    let key = |v: &Value| {
        v["attributes"][0]["external_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    sent.sort_by_key(key);
    dumped.sort_by_key(key);
    assert_eq!(dumped, sent);
}

/// The dump holds personal data: a new file readable by its owner only, replacing a file
/// there before (never writing into it: a hard link to it keeps its contents); a symbolic
/// link at the path is refused as bad input, its target untouched.
#[cfg(unix)]
#[tokio::test]
async fn the_dump_is_private_and_never_written_through_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::start().await;
    w.looker.add_look("42", Look::users(20, Generator::Clean));
    let yaml = w.yaml("42", "", "");
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("payloads.jsonl");
    std::fs::write(&dump, "an earlier dump\n").unwrap();
    std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o644)).unwrap();
    let kept = dir.path().join("kept");
    std::fs::hard_link(&dump, &kept).unwrap();
    let (out, _s) = cli_run(&yaml, &["--dump-payloads", dump.to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mode = std::fs::metadata(&dump).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    assert_eq!(std::fs::read_to_string(&dump).unwrap().lines().count(), 1);
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "an earlier dump\n",
        "the file there before is replaced, not written into"
    );

    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&kept, &link).unwrap();
    let requests = w.braze.request_count();
    let (out, _s) = cli_run(&yaml, &["--dump-payloads", link.to_str().unwrap()]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("--dump-payloads {}", link.display()))
            && out.stderr.contains("symbolic link"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "an earlier dump\n");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(w.braze.request_count(), requests, "nothing was sent");
}

#[tokio::test]
async fn bad_input_exits_2_naming_the_problem() {
    let w = World::start().await;
    let good = w.yaml("42", "", "");

    let (out, _s) = cli_run(&good, &[]).await;
    assert_eq!(
        out.code, 1,
        "the good spec runs (and fails: there is no Look 42): {}",
        out.stderr
    );
    let talked = w.looker.requests().len() + w.braze.requests().len();
    assert!(talked > 0);

    let spec = write_spec(&good);
    let out = cli_spec(&spec, &[], &["LOOKERSDK_CLIENT_SECRET"], &[]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("missing credential: set LOOKERSDK_CLIENT_SECRET"),
        "{}",
        out.stderr
    );
    let out = cli_spec(&spec, &[], &["BRAZE_API_KEY"], &[]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("BRAZE_API_KEY"), "{}", out.stderr);

    let out = cli(&["run", "--file", "/nonexistent/export.yaml"], &[], &[]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("cannot read /nonexistent/export.yaml"),
        "{}",
        out.stderr
    );

    let (out, _s) = cli_run(
        &good.replace(
            "schedule: \"0 6 * * *\"",
            "schedule: \"0 25 * * *\"\n  timeZone: Mars/Olympus",
        ),
        &[],
    )
    .await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("spec.schedule: invalid cron expression"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("spec.timeZone: unknown time zone \"Mars/Olympus\""),
        "{}",
        out.stderr
    );

    let (out, _s) = cli_run(&w.yaml("42", "identifier: user_alias", ""), &[]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("spec.braze.aliasLabel: is required when identifier is user_alias"),
        "{}",
        out.stderr
    );
    assert_eq!(
        w.looker.requests().len() + w.braze.requests().len(),
        talked,
        "bad input never reaches Looker or Braze"
    );
}

#[tokio::test]
async fn a_smuggled_endpoint_host_is_refused_before_any_request() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    for endpoint in [
        "https://evil.example/?x=.braze.com",
        "https://rest.braze.com.evil.example",
        "http://rest.iad-01.braze.com",
    ] {
        let yaml = w.yaml("42", "", "").replace(
            &format!("endpoint: {}", w.braze.url),
            &format!("endpoint: \"{endpoint}\""),
        );
        let (out, _s) = cli_run(&yaml, &[]).await;
        assert_eq!(out.code, 2, "{endpoint}");
        assert!(
            out.stderr.contains("spec.braze.endpoint:"),
            "{}",
            out.stderr
        );
    }
    assert!(
        w.looker.requests().is_empty() && w.braze.requests().is_empty(),
        "no request went anywhere"
    );
}

#[tokio::test]
async fn braze_401_stops_the_run_at_once() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(2000, Generator::Clean));
    let spec = write_spec(&w.yaml("42", "batchSize: 10\nconcurrency: 1", ""));
    let out = cli_spec(
        &spec,
        &["--output", "json"],
        &[],
        &[("BRAZE_API_KEY", "wrong-key")],
    )
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    let r = out.report();
    assert_eq!(r["outcome"], "Failed");
    assert_eq!(r["sent"], 0);
    assert_eq!(r["requests"], 1, "no request after the 401");
    assert_eq!(r["errors"][0]["reason"], "BrazeUnauthorized");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("Braze refused the API key") && msg.contains("another Braze instance"),
        "{msg}"
    );
    let rows = r["rowsRead"].as_u64().unwrap();
    assert_eq!(
        rows,
        r["failed"].as_u64().unwrap(),
        "every row read is counted as failed"
    );
    assert!(rows < 2000, "the run stopped reading Looker: {rows}");
}

#[tokio::test]
async fn braze_403_names_the_permission() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    w.braze.forbid_key("read-only-key");
    let spec = write_spec(&w.yaml("42", "", ""));
    let out = cli_spec(
        &spec,
        &["--output", "json"],
        &[],
        &[("BRAZE_API_KEY", "read-only-key")],
    )
    .await;
    assert_eq!(out.code, 1);
    let r = out.report();
    assert_eq!(r["errors"][0]["reason"], "BrazeForbidden");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("needs the users.track permission"),
        "{r}"
    );
}

#[tokio::test]
async fn per_object_errors_give_partial_success_and_exit_3() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(100, Generator::Clean));
    w.braze.reject_id("user-0000007");
    w.braze.reject_id("user-0000090");
    let (out, _s) = cli_run(&w.yaml("42", "", ""), &[]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    let r = out.report();
    assert_eq!(r["outcome"], "PartiallySucceeded");
    assert_eq!(
        (r["sent"].as_u64(), r["rejected"].as_u64()),
        (Some(98), Some(2))
    );
    assert_eq!(
        r["errors"][0],
        json!({"reason": "BrazeRejected", "count": 2, "message": "Braze rejected rows 7, 90: provided external_id is blacklisted and disallowed"})
    );
}

#[tokio::test]
async fn looker_failures_exit_1_with_a_message_naming_the_cause() {
    let w = World::start().await;
    let pivoted = {
        let mut l = Look::users(3, Generator::Clean);
        l.fields["pivots"] = json!([field("orders.status", &[])]);
        l
    };
    w.looker.add_look("pivoted", pivoted);
    let untagged = Look::new(
        json!({"dimensions": [field("users.id", &[])]}),
        Rows::Fixed(vec![row(&[("users.id", json!("a"))])]),
    );
    w.looker.add_look("untagged", untagged);
    for (look, reason, text) in [
        ("pivoted", "PivotNotSupported", "pivots are not supported"),
        (
            "untagged",
            "NoIdField",
            "no field of the Look is tagged braze_id",
        ),
        ("404", "LookNotFound", "Look 404 was not found"),
    ] {
        let (out, _s) = cli_run(&w.yaml(look, "", ""), &[]).await;
        assert_eq!(out.code, 1, "{look}: {}", out.stderr);
        let r = out.report();
        assert_eq!(r["errors"][0]["reason"], reason, "{look}");
        assert!(r["message"].as_str().unwrap().contains(text), "{look}: {r}");
    }
    assert_eq!(w.braze.request_count(), 0);

    let spec = write_spec(&w.yaml("pivoted", "", ""));
    let out = cli_spec(
        &spec,
        &["--output", "json"],
        &[],
        &[("LOOKERSDK_CLIENT_SECRET", "wrong")],
    )
    .await;
    assert_eq!(out.code, 1);
    assert!(
        out.report()["message"]
            .as_str()
            .unwrap()
            .contains("Looker refused the API credentials"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn text_output_is_a_readable_summary() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(300, Generator::Dirty));
    let spec = write_spec(&w.yaml("42", "", ""));
    let out = cli_spec(&spec, &[], &[], &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("Export test-export (Look 42): Succeeded\n  293 users flagged, 5 duplicates, 2 invalid rows\n"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("NullIdentifier (2): rows 125, 250 have no users.external_id value"),
        "{}",
        out.stdout
    );
}

/// Secrets never reach the output, even at trace level; identifiers and attribute values
/// never reach it at debug level (they are personal data).
#[tokio::test]
async fn no_secret_at_trace_and_no_personal_data_at_debug() {
    let w = World::start().await;
    let people = Look::new(
        json!({"dimensions": [field("users.email", &["braze_id"]), field("users.name", &["braze[full_name]"])]}),
        Rows::Fixed(vec![
            row(&[
                ("users.email", json!("ada.lovelace@example.org")),
                ("users.name", json!("Ada Lovelace")),
            ]),
            row(&[
                ("users.email", json!("ada.lovelace@example.org")),
                ("users.name", json!("Ada Again")),
            ]),
            row(&[
                ("users.email", json!("grace.hopper@example.org")),
                ("users.name", json!("Grace Hopper")),
            ]),
            row(&[
                ("users.email", Value::Null),
                ("users.name", json!("Nobody Knows")),
            ]),
        ]),
    );
    w.looker.add_look("42", people);
    w.braze.reject_id("grace.hopper@example.org");
    w.braze
        .inject([Fault::Status(503), Fault::RateLimited { retry_after: 0 }]);
    w.looker.expire_next_tokens_after(std::time::Duration::ZERO);
    let spec = write_spec(&w.yaml("42", "", ""));
    let path = spec.path().to_str().unwrap();

    let trace = cli(
        &["run", "--file", path, "--output", "json"],
        &[],
        &[("RUST_LOG", "trace")],
    )
    .await;
    assert_eq!(trace.code, 3, "{}", trace.stderr);
    let tokens = w.access_tokens();
    assert_eq!(tokens.len(), 2, "the expired token was replaced");
    let wrong_key = cli(
        &["run", "--file", path, "--output", "json"],
        &[],
        &[
            ("RUST_LOG", "trace"),
            ("BRAZE_API_KEY", "wrong-key-do-not-leak"),
        ],
    )
    .await;
    assert_eq!(wrong_key.code, 1);
    for out in [&trace, &wrong_key] {
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(all.len() > 1000, "trace logging is on");
        for secret in [CLIENT_SECRET, API_KEY, "wrong-key-do-not-leak"]
            .iter()
            .map(|s| s.to_string())
            .chain(tokens.clone())
        {
            assert!(!all.contains(&secret), "secret {secret:?} leaked");
        }
    }

    let debug = cli(
        &["run", "--file", path, "--output", "json"],
        &[],
        &[("RUST_LOG", "debug")],
    )
    .await;
    assert_eq!(debug.code, 3);
    let all = format!("{}{}", debug.stdout, debug.stderr);
    assert!(all.contains("DEBUG"), "debug logging is on");
    for personal in [
        "ada.lovelace",
        "grace.hopper",
        "Ada Lovelace",
        "Ada Again",
        "Grace Hopper",
        "Nobody Knows",
    ] {
        assert!(
            !all.contains(personal),
            "{personal:?} appeared in the output:\n{all}"
        );
    }
    let r = debug.report();
    assert_eq!(
        (
            r["sent"].as_u64(),
            r["duplicates"].as_u64(),
            r["invalid"].as_u64(),
            r["rejected"].as_u64()
        ),
        (Some(1), Some(1), Some(1), Some(1))
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    let spec = write_spec(&w.yaml("42", "", ""));
    let out = cli_spec(
        &spec,
        &["--log-format", "json"],
        &[],
        &[("RUST_LOG", "info")],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let finished = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("run finished"))
        })
        .expect("a run finished line");
    assert_eq!(
        (
            finished["level"].as_str(),
            finished["outcome"].as_str(),
            finished["sent"].as_u64()
        ),
        (Some("INFO"), Some("Succeeded"), Some(10))
    );
}

/// Time zones work without zoneinfo files (as in a distroless image): the database is built in.
#[tokio::test]
async fn time_zones_need_no_zoneinfo_files() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(3, Generator::Clean));
    let spec = write_spec(&w.yaml("42", "", "timeZone: America/Argentina/Ushuaia"));
    let empty = tempfile::tempdir().unwrap();
    let out = cli_spec(
        &spec,
        &["--dry-run"],
        &[],
        &[("TZDIR", empty.path().to_str().unwrap())],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let bad = write_spec(&w.yaml("42", "", "timeZone: America/Atlantis"));
    let out = cli_spec(
        &bad,
        &["--dry-run"],
        &[],
        &[("TZDIR", empty.path().to_str().unwrap())],
    )
    .await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("spec.timeZone: unknown time zone \"America/Atlantis\""),
        "{}",
        out.stderr
    );
}
