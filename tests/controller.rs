//! The controller end to end: a real kube-runtime `Controller` against the project's fake
//! apiserver, with the sandbox Looker and Braze, asserting the status a user would read.

#[path = "support/fake.rs"]
mod fake;
#[path = "support/operator.rs"]
mod operator;
mod support;

use std::time::Duration;

use braze_export_operator::controller::Config;
use braze_export_operator::sandbox::{Fault, Generator, Look, Rows};
use fake::Start as _;
use fake_apiserver::{self as apiserver, EXPORTS, FakeApiServer};
use operator::*;
use serde_json::json;
use support::*;

#[tokio::test]
async fn run_now_runs_once_and_reports_in_status() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(300, Generator::Dirty));
    secrets(&api);
    put_export(&api, &w, "churn", "42", "", "");
    let op = Operator::start(&api, config());
    let pending = wait_ready(&api, "churn", "Pending", 10).await;
    assert_eq!(condition(&pending, "Ready")["status"], "Unknown");
    assert!(pending["nextScheduleTime"].is_string());

    run_now(&api, "churn", "2026-11-29T10:00:00Z");
    let s = wait_ready(&api, "churn", "Succeeded", 20).await;
    let ready = condition(&s, "Ready");
    assert_eq!(ready["status"], "True");
    assert_eq!(
        ready["message"],
        "293 users flagged, 5 duplicates, 2 invalid rows"
    );
    assert_eq!(ready["observedGeneration"], 1);
    assert_eq!(s["observedGeneration"], 1);
    assert_eq!(s["lastHandledRunRequest"], "2026-11-29T10:00:00Z");
    let last = &s["lastRun"];
    assert_eq!(
        (last["trigger"].as_str(), last["outcome"].as_str()),
        (Some("Manual"), Some("Succeeded"))
    );
    assert_eq!(
        (
            last["rowsRead"].as_u64(),
            last["sent"].as_u64(),
            last["duplicates"].as_u64(),
            last["invalid"].as_u64()
        ),
        (Some(300), Some(293), Some(5), Some(2))
    );
    assert_eq!(s["history"].as_array().unwrap().len(), 1);
    assert!(s["lastSuccessfulTime"].is_string());
    assert_eq!(w.braze.accepted_count(), 293);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(&api, "churn")["history"].as_array().unwrap().len(),
        1,
        "the same run-now value runs once"
    );
    let ev = events(&api, "churn");
    assert!(
        ev.iter()
            .any(|(t, r, _)| t == "Normal" && r == "RunStarted"),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|(t, r, n)| t == "Normal"
            && r == "RunSucceeded"
            && n == "293 users flagged, 5 duplicates, 2 invalid rows"),
        "{ev:?}"
    );
    let spec_writes: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH") && r.contains("/brazeexports/churn?"))
        .collect();
    assert!(
        spec_writes.is_empty(),
        "the controller never writes the spec: {spec_writes:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn a_scheduled_run_fires_at_its_time() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(20, Generator::Clean));
    secrets(&api);
    // The operator's clock runs 1.5 s before a minute boundary: no waiting for a real one.
    let real = jiff::Timestamp::now();
    let boundary =
        jiff::Timestamp::from_second(real.as_second() - real.as_second().rem_euclid(60) + 120)
            .unwrap();
    let offset = boundary.duration_since(real) - jiff::SignedDuration::from_millis(1500);
    let shifted_now = (real + offset).round(jiff::Unit::Second).unwrap();
    let mut object = export_object(&w, "minutely", "42", "", "");
    object["spec"]["schedule"] = json!("* * * * *");
    // Created "now" by the operator's clock: the tick before it is not due.
    object["metadata"]["creationTimestamp"] = json!(shifted_now.to_string());
    api.put(EXPORTS, object);
    let op = Operator::start(
        &api,
        Config {
            clock_offset: offset,
            ..config()
        },
    );
    let pending = wait_ready(&api, "minutely", "Pending", 10).await;
    assert_eq!(pending["nextScheduleTime"], json!(boundary.to_string()));
    let s = wait_for("a scheduled run", 15, || {
        let s = status(&api, "minutely");
        (s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    let due: jiff::Timestamp = s["lastScheduleTime"].as_str().unwrap().parse().unwrap();
    let started: jiff::Timestamp = s["lastRun"]["startTime"].as_str().unwrap().parse().unwrap();
    assert_eq!(due, boundary, "due on the minute");
    assert!(
        started >= due && started.duration_since(due) < jiff::SignedDuration::from_secs(2),
        "started on time: due {due}, started {started}"
    );
    assert_eq!(s["lastRun"]["trigger"], "Schedule");
    assert_eq!(
        history(&s),
        ["Schedule Succeeded"],
        "the tick before creation did not run"
    );
    let next: jiff::Timestamp = s["nextScheduleTime"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        next.duration_since(due),
        jiff::SignedDuration::from_secs(60)
    );
    op.stop().await;
}

#[tokio::test]
async fn bad_exports_say_why_and_never_disturb_a_healthy_one() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(30, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "healthy", "42", "", "");
    put_export(&api, &w, "bad-zone", "42", "", "timeZone: Mars/Olympus");
    put_export(&api, &w, "bad-cron", "42", "", "");
    api.patch(
        EXPORTS,
        NS,
        "bad-cron",
        json!({"spec": {"schedule": "0 25 * * *"}}),
    );
    put_export(&api, &w, "no-secret", "42", "", "");
    api.patch(
        EXPORTS,
        NS,
        "no-secret",
        json!({"spec": {"braze": {"apiKeySecretRef": {"name": "missing-braze"}}}}),
    );
    put_export(&api, &w, "no-key", "42", "", "");
    api.patch(
        EXPORTS,
        NS,
        "no-key",
        json!({"spec": {"looker": {"credentialsSecretRef": {"clientSecretKey": "secret"}}}}),
    );
    let op = Operator::start(&api, config());
    for name in ["healthy", "bad-zone", "bad-cron", "no-secret", "no-key"] {
        run_now(&api, name, "now-1");
    }
    let zone = condition(
        &wait_ready(&api, "bad-zone", "InvalidSpec", 10).await,
        "Ready",
    );
    assert_eq!(zone["status"], "False");
    assert!(
        zone["message"]
            .as_str()
            .unwrap()
            .contains("spec.timeZone: unknown time zone \"Mars/Olympus\""),
        "{zone}"
    );
    let cron = condition(
        &wait_ready(&api, "bad-cron", "InvalidSpec", 10).await,
        "Ready",
    );
    assert!(
        cron["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.schedule: invalid cron expression \"0 25 * * *\""),
        "{cron}"
    );
    let missing = condition(
        &wait_ready(&api, "no-secret", "SecretNotFound", 10).await,
        "Ready",
    );
    assert_eq!(
        missing["message"],
        "Secret marketing/missing-braze not found (spec.braze.apiKeySecretRef)"
    );
    let key = condition(
        &wait_ready(&api, "no-key", "SecretNotFound", 10).await,
        "Ready",
    );
    assert_eq!(
        key["message"],
        "Secret marketing/looker-api has no key \"secret\" (spec.looker.credentialsSecretRef)"
    );
    let ok = wait_ready(&api, "healthy", "Succeeded", 20).await;
    assert_eq!(ok["lastRun"]["sent"], 30);
    assert!(
        events(&api, "bad-zone")
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "InvalidSpec")
    );
    assert!(
        events(&api, "no-secret")
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "SecretNotFound")
    );

    // Creating the Secret fixes the export on its next look, without a restart.
    api.put_secret(NS, "missing-braze", &[("api_key", API_KEY)]);
    api.patch(
        EXPORTS,
        NS,
        "no-secret",
        json!({"metadata": {"annotations": {"touch": "1"}}}),
    );
    wait_ready(&api, "no-secret", "Succeeded", 20).await;
    op.stop().await;
}

#[tokio::test]
async fn a_spec_change_bumps_observed_generation() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "gen", "42", "", "");
    let op = Operator::start(&api, config());
    wait_for("generation 1 observed", 10, || {
        (status(&api, "gen")["observedGeneration"] == 1).then_some(())
    })
    .await;
    api.patch(
        EXPORTS,
        NS,
        "gen",
        json!({"spec": {"braze": {"exportName": "VIP"}}}),
    );
    let s = wait_for("generation 2 observed", 10, || {
        let s = status(&api, "gen");
        (s["observedGeneration"] == 2).then_some(s)
    })
    .await;
    assert_eq!(condition(&s, "Ready")["observedGeneration"], 2);
    run_now(&api, "gen", "r1");
    wait_ready(&api, "gen", "Succeeded", 20).await;
    assert_eq!(
        w.braze.accepted()[0]["looker_export"],
        json!({"add": ["VIP"]}),
        "the new spec is used"
    );
    op.stop().await;
}

#[tokio::test]
async fn shutdown_records_interrupted_and_the_next_operator_runs_again() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(600, Generator::Clean));
    w.braze.inject([Fault::Slow(Duration::from_secs(60)); 2]);
    secrets(&api);
    put_export(&api, &w, "long", "42", "concurrency: 2", "");
    let op = Operator::start(&api, config());
    run_now(&api, "long", "r1");
    wait_for("the run to start", 10, || {
        (condition(&status(&api, "long"), "Running")["status"] == "True").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    op.stop().await;
    let s = status(&api, "long");
    assert_eq!(s["lastRun"]["outcome"], "Interrupted", "{s}");
    assert_eq!(condition(&s, "Running")["status"], "False");
    let last = &s["lastRun"];
    assert_eq!(
        last["rowsRead"].as_u64().unwrap(),
        [
            "sent",
            "duplicates",
            "invalid",
            "rejected",
            "failed",
            "skipped"
        ]
        .iter()
        .map(|k| last[*k].as_u64().unwrap())
        .sum::<u64>(),
        "nothing lost: {last}"
    );

    let op = Operator::start(&api, config());
    let s = wait_ready(&api, "long", "Succeeded", 20).await;
    let history = history(&s);
    assert_eq!(history, ["Retry Succeeded", "Manual Interrupted"]);
    assert_eq!(w.delivered_set().len(), 600);
    op.stop().await;
}

#[tokio::test]
async fn a_run_left_running_by_a_crash_is_interrupted_and_run_again() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "crashed", "42", "", "");
    let started = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(30)).to_string();
    api.patch(
        EXPORTS,
        NS,
        "crashed",
        json!({"status": {
            "conditions": [{"type": "Running", "status": "True", "reason": "Running", "message": "Manual run started", "lastTransitionTime": started}],
            "runner": "old-pod_0000beef",
            "lastRun": {"trigger": "Manual", "startTime": started, "outcome": "Running", "rowsRead": 4, "sent": 3, "duplicates": 0, "invalid": 0, "rejected": 0, "failed": 0, "skipped": 0, "requests": 0, "retries": 0, "rateLimited": 0, "errors": [], "message": "running"},
            "history": []
        }}),
    );
    let op = Operator::start(&api, config());
    let s = wait_ready(&api, "crashed", "Succeeded", 20).await;
    let history = history(&s);
    assert_eq!(history, ["Retry Succeeded", "Manual Interrupted"]);
    assert!(s.get("runner").is_none(), "no runner once idle: {s}");
    let interrupted = events(&api, "crashed")
        .into_iter()
        .find(|(_, r, _)| r == "RunInterrupted")
        .expect("a RunInterrupted event");
    assert!(
        interrupted
            .2
            .contains("operator instance old-pod_0000beef stopped during the run"),
        "{interrupted:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn with_leader_election_two_operators_run_each_export_once() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(150, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "shared", "42", "", "");
    let a = Operator::start(&api, elected("replica-a"));
    let b = Operator::start(&api, elected("replica-b"));
    for i in 0..3 {
        run_now(&api, "shared", &format!("r{i}"));
        wait_for("the run", 20, || {
            let s = status(&api, "shared");
            (s["lastHandledRunRequest"] == format!("r{i}")
                && s["lastRun"]["outcome"] == "Succeeded")
                .then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(&api, "shared")["history"].as_array().unwrap().len(),
        3,
        "three run-now values, three runs"
    );
    assert_eq!(
        w.braze.request_count(),
        6,
        "each run sent its 2 batches once"
    );
    assert_eq!(w.looker.requests_to("/run/json_detail").len(), 3);
    let holder = api
        .get(apiserver::LEASES, "default", "braze-export-operator")
        .unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_owned();

    // The leader leaves; the other takes over.
    let (leader, standby) = if holder == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    leader.stop().await;
    run_now(&api, "shared", "after-handover");
    wait_for("the standby's run", 30, || {
        let s = status(&api, "shared");
        (s["lastHandledRunRequest"] == "after-handover" && s["lastRun"]["outcome"] == "Succeeded")
            .then_some(())
    })
    .await;
    let new_holder = api
        .get(apiserver::LEASES, "default", "braze-export-operator")
        .unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_holder, holder);
    standby.stop().await;
}

#[tokio::test]
async fn namespace_and_selector_scope_the_controller() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "team-a", "42", "", "");
    api.patch(
        EXPORTS,
        NS,
        "team-a",
        json!({"metadata": {"labels": {"team": "a"}}}),
    );
    put_export(&api, &w, "team-b", "42", "", "");
    api.patch(
        EXPORTS,
        NS,
        "team-b",
        json!({"metadata": {"labels": {"team": "b"}}}),
    );
    let op = Operator::start(
        &api,
        Config {
            selector: Some("team=a".into()),
            namespaces: vec![NS.into()],
            ..config()
        },
    );
    wait_ready(&api, "team-a", "Pending", 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        status(&api, "team-b").is_null(),
        "team-b is not this controller's"
    );
    op.stop().await;
    let other = Operator::start(
        &api,
        Config {
            namespaces: vec!["elsewhere".into()],
            ..config()
        },
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(status(&api, "team-b").is_null(), "another namespace");
    other.stop().await;
}

#[test]
fn the_fake_apiserver_merges_like_rfc_7386_and_encodes_like_base64() {
    let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}});
    apiserver::merge(&mut v, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
    assert_eq!(v, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    assert_eq!(apiserver::base64(b"client_secret"), "Y2xpZW50X3NlY3JldA==");
    assert_eq!(
        (apiserver::base64(b"ab"), apiserver::base64(b"abc")),
        ("YWI=".to_string(), "YWJj".to_string())
    );
}

/// A run's message long and non-ASCII (a Look whose field names are full of "é", listed when
/// `idField` is none of them) still makes its Event: the note is cut to the apiserver's 1,024
/// bytes on a character boundary (1,000 characters of "é" would be refused, 422).
#[tokio::test]
async fn a_long_non_ascii_run_message_still_lands_in_an_event() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    let names: Vec<String> = (0..20)
        .map(|i| format!("users.{i:02}{}", "é".repeat(78)))
        .collect();
    let dimensions: Vec<_> = names.iter().map(|n| field(n, &["braze[x]"])).collect();
    let fields =
        json!({"dimensions": dimensions, "measures": [], "table_calculations": [], "pivots": []});
    w.looker
        .add_look("42", Look::new(fields, Rows::Fixed(Vec::new())));
    secrets(&api);
    let yaml = w
        .yaml_looker("42", "idField: users.nope", "", "")
        .replace("name: test-export", "name: accents");
    api.put(EXPORTS, serde_saphyr::from_str(&yaml).expect("yaml"));
    let op = Operator::start(&api, config());
    run_now(&api, "accents", "r1");
    let s = wait_ready(&api, "accents", "Failed", 20).await;
    let message = s["lastRun"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("is not a field of the Look"), "{message}");
    let note = wait_for("the RunFailed Event", 10, || {
        events(&api, "accents")
            .into_iter()
            .find(|(t, r, _)| t == "Warning" && r == "RunFailed")
            .map(|(_, _, note)| note)
    })
    .await;
    assert!(
        note.len() <= 1024 && note.len() > 1000,
        "cut to 1,024 bytes: {}",
        note.len()
    );
    assert!(note.ends_with('…'), "{note}");
    assert!(
        note.starts_with("Look 42: spec.looker.idField users.nope is not a field"),
        "{note}"
    );
    op.stop().await;
}
