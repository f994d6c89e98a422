//! The controller under the conditions of a real installation: two pods during a rollout, a
//! leader cut off from the apiserver, standby replicas, a lagging watch, an export written for
//! a newer operator, a queue of runs, a recreated namesake, a run that keeps crashing. Each
//! test fails on the controller before these were handled.

#[path = "support/fake.rs"]
mod fake;
#[path = "support/operator.rs"]
mod operator;
mod support;

use std::time::Duration;

use braze_export_operator::controller::Config;
use braze_export_operator::sandbox::{Fault, Generator, Look};
use fake::Start as _;
use fake_apiserver::{self as apiserver, EXPORTS, FakeApiServer};
use operator::*;
use serde_json::json;
use support::*;

/// A world where export `name` runs slowly enough to be caught mid-run: a Look of `users`,
/// Braze `latency_ms` away, and one 10-user request at a time.
async fn slow_run(name: &str, users: u64, latency_ms: u64) -> (FakeApiServer, World) {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker
        .add_look("42", Look::users(users, Generator::Clean));
    w.braze
        .set_latency(Duration::from_millis(latency_ms), Duration::ZERO);
    secrets(&api);
    put_export(&api, &w, name, "42", ONE_SMALL_BATCH_AT_A_TIME, "");
    (api, w)
}

/// `spec.braze` lines for one 10-user request in flight at a time.
const ONE_SMALL_BATCH_AT_A_TIME: &str = "batchSize: 10\nconcurrency: 1";

/// A rollout: the old pod leads, the new one stands by (and is Ready); the old one gets
/// SIGTERM mid-run. The run is recorded Interrupted by its own runner and retried once by the
/// new leader; never two runners, never a run taken for a crash while its runner lives.
#[tokio::test]
async fn a_rolling_update_runs_each_export_once() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(600, Generator::Clean));
    w.braze.inject([Fault::Slow(Duration::from_secs(60)); 2]);
    secrets(&api);
    put_export(&api, &w, "rollout", "42", "concurrency: 2", "");
    let old = Operator::start(&api, elected("old-pod"));
    wait_for("the old pod to lead", 10, || {
        (holder(&api).as_deref() == Some("old-pod")).then_some(())
    })
    .await;
    let new = Operator::start(&api, elected("new-pod"));
    run_now(&api, "rollout", "during-the-overlap");
    wait_for("the run on the old pod", 10, || {
        let s = status(&api, "rollout");
        (condition(&s, "Running")["status"] == "True").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(new.is_ready(), "the standby is Ready during the rollout");
    assert_eq!(new.metric("braze_export_leader "), Some(0.0));
    assert_eq!(old.metric("braze_export_leader "), Some(1.0));
    assert_eq!(
        status(&api, "rollout")["runner"],
        "old-pod",
        "the runner is named in the status"
    );
    assert_eq!(
        w.looker.requests_to("/run/json_detail").len(),
        1,
        "the standby does not run it too"
    );

    old.stop().await;
    let s = wait_ready(&api, "rollout", "Succeeded", 30).await;
    assert_eq!(history(&s), ["Retry Succeeded", "Manual Interrupted"]);
    let crash_notes: Vec<_> = events(&api, "rollout")
        .into_iter()
        .filter(|(_, _, note)| note.contains("operator instance"))
        .collect();
    assert!(
        crash_notes.is_empty(),
        "the old pod recorded its own interruption; nobody took it for a crash: {crash_notes:?}"
    );
    assert_eq!(holder(&api).as_deref(), Some("new-pod"));
    assert_eq!(w.looker.requests_to("/run/json_detail").len(), 2);
    assert_eq!(w.delivered_set().len(), 600);
    new.stop().await;
}

/// A leader cut off from the apiserver stops sending to Braze before the standby can take
/// the Lease; the standby then records the run Interrupted (its runner is gone) and retries.
#[tokio::test]
async fn a_leader_that_cannot_renew_stops_its_runs_before_another_takes_over() {
    let (api, w) = slow_run("partitioned", 3000, 40).await;
    let (cut_client, partition) = api.partitionable_client();
    let a = Operator::start_with(cut_client, elected("pod-a"));
    wait_for("pod-a to lead", 10, || {
        (holder(&api).as_deref() == Some("pod-a")).then_some(())
    })
    .await;
    // pod-b waits 3 s before retrying: the quiet window below is pod-a's alone.
    let b = Operator::start(
        &api,
        Config {
            retry_base: jiff::SignedDuration::from_secs(3),
            ..elected("pod-b")
        },
    );
    run_now(&api, "partitioned", "r1");
    wait_for("sending", 10, || {
        (w.braze.request_count() > 5).then_some(())
    })
    .await;

    partition.cut();
    let cut_at = tokio::time::Instant::now();
    let taken_at = wait_for("pod-b to take the Lease", 15, || {
        (holder(&api).as_deref() == Some("pod-b")).then(tokio::time::Instant::now)
    })
    .await;
    assert!(
        taken_at - cut_at >= Duration::from_secs(2),
        "the Lease outlived the cut"
    );
    // From the takeover, neither pod sends for a while: pod-a stopped before it, and pod-b
    // waits the retry backoff (1 s here) before running again.
    let at_takeover = w.braze.request_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        w.braze.request_count(),
        at_takeover,
        "pod-a kept sending after losing the Lease"
    );
    let s = wait_ready(&api, "partitioned", "Succeeded", 60).await;
    assert_eq!(history(&s), ["Retry Succeeded", "Manual Interrupted"]);
    assert!(
        s["history"][1]["sent"].as_u64().unwrap() < 3000,
        "the first run was cut short: {s}"
    );

    // Healed, pod-a's late writes cannot undo what pod-b recorded.
    partition.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        history(&status(&api, "partitioned")),
        ["Retry Succeeded", "Manual Interrupted"]
    );
    assert_eq!(w.delivered_set().len(), 3000);
    assert_eq!(
        w.braze.max_in_flight(),
        1,
        "one request at a time per run: never two runners at once"
    );
    a.stop().await;
    b.stop().await;
}

/// The Lease deleted mid-run (a common "unstick" move): the holder stops at once, and nobody
/// takes the new Lease before a whole duration has passed, so two runners never overlap.
#[tokio::test]
async fn a_deleted_lease_never_makes_two_leaders() {
    let (api, w) = slow_run("unstuck", 2000, 30).await;
    let a = Operator::start(&api, elected("pod-a"));
    wait_for("pod-a to lead", 10, || {
        (holder(&api).as_deref() == Some("pod-a")).then_some(())
    })
    .await;
    let b = Operator::start(&api, elected("pod-b"));
    run_now(&api, "unstuck", "r1");
    wait_for("sending", 10, || {
        (w.braze.request_count() > 5).then_some(())
    })
    .await;
    api.delete(apiserver::LEASES, "default", "braze-export-operator");
    let s = wait_ready(&api, "unstuck", "Succeeded", 60).await;
    assert_eq!(history(&s), ["Retry Succeeded", "Manual Interrupted"]);
    assert_eq!(w.delivered_set().len(), 2000);
    assert_eq!(w.braze.max_in_flight(), 1, "never two runners at once");
    a.stop().await;
    b.stop().await;
}

/// With the watch 2 s behind the writes, a finished run stays finished: the stale `Running`
/// the cache still shows is never taken for a crash, and the run never repeats.
#[tokio::test]
async fn a_lagging_watch_never_makes_a_finished_run_look_crashed() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(150, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "lagging", "42", "", "");
    let op = Operator::start(&api, config());
    wait_ready(&api, "lagging", "Pending", 10).await;
    api.set_watch_lag(Duration::from_secs(2));
    run_now(&api, "lagging", "r1");
    let s = wait_ready(&api, "lagging", "Succeeded", 20).await;
    assert_eq!(history(&s), ["Manual Succeeded"]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = status(&api, "lagging");
    assert_eq!(history(&s), ["Manual Succeeded"], "{s}");
    assert_eq!(w.looker.requests_to("/run/json_detail").len(), 1);
    assert_eq!(w.braze.request_count(), 2);

    // A relist (410 Gone) in the middle changes nothing either.
    api.expire_watches();
    let lists = api.list_count(EXPORTS);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(api.list_count(EXPORTS) > lists, "the watcher relisted");
    assert_eq!(history(&status(&api, "lagging")), ["Manual Succeeded"]);
    op.stop().await;
}

/// After a rollback, one export carrying a field only the newer CRD knows gets its own
/// `InvalidSpec`, naming the field; every other export runs; the error is counted.
#[tokio::test]
async fn an_export_this_version_cannot_read_affects_only_itself() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(30, Generator::Clean));
    secrets(&api);
    let mut newer = serde_json::to_value(
        <braze_export_operator::spec::BrazeExport as kube::CustomResourceExt>::crd(),
    )
    .unwrap();
    newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["braze"]["properties"]["audienceMode"] =
        json!({"type": "string", "enum": ["Keep", "Mirror"]});
    api.set_crd(newer);
    put_export(&api, &w, "healthy", "42", "", "");
    put_export(
        &api,
        &w,
        "from-the-future",
        "42",
        "audienceMode: Mirror",
        "",
    );
    put_export(&api, &w, "also-healthy", "42", "", "");
    let op = Operator::start(&api, config());
    for name in ["healthy", "from-the-future", "also-healthy"] {
        run_now(&api, name, "r1");
    }
    let bad = wait_ready(&api, "from-the-future", "InvalidSpec", 10).await;
    let ready = condition(&bad, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(
        ready["message"],
        "spec.braze.audienceMode: unknown field `audienceMode`: this operator version cannot read the export; a newer operator may be needed"
    );
    for name in ["healthy", "also-healthy"] {
        assert_eq!(
            wait_ready(&api, name, "Succeeded", 20).await["lastRun"]["sent"],
            30
        );
    }
    assert!(
        op.metric("braze_export_watch_errors_total{reason=\"UndecodableObject\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    op.stop().await;
}

/// With one run slot and four exports due, one runs and three show `Queued`; each run's
/// start time is when it really started, so no two runs overlap.
#[tokio::test]
async fn waiting_for_a_slot_shows_queued_not_running() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(40, Generator::Clean));
    w.braze
        .set_latency(Duration::from_millis(300), Duration::ZERO);
    secrets(&api);
    let names = ["q1", "q2", "q3", "q4"];
    for name in names {
        put_export(&api, &w, name, "42", ONE_SMALL_BATCH_AT_A_TIME, "");
    }
    let op = Operator::start(
        &api,
        Config {
            max_concurrent_runs: 1,
            ..config()
        },
    );
    for name in names {
        run_now(&api, name, "r1");
    }
    let mut most_running = 0;
    let mut saw_queued = false;
    wait_for("four runs", 60, || {
        let statuses: Vec<_> = names.iter().map(|n| status(&api, n)).collect();
        let running = statuses
            .iter()
            .filter(|s| condition(s, "Running")["status"] == "True")
            .count();
        most_running = most_running.max(running);
        saw_queued |= statuses.iter().any(|s| {
            let c = condition(s, "Running");
            c["status"] == "False" && c["reason"] == "Queued"
        });
        statuses
            .iter()
            .all(|s| {
                s["lastRun"]["outcome"] == "Succeeded"
                    && condition(s, "Running")["status"] == "False"
            })
            .then_some(())
    })
    .await;
    assert_eq!(
        most_running, 1,
        "only the run holding the slot shows Running"
    );
    assert!(saw_queued, "the others showed Queued");
    let mut spans: Vec<(jiff::Timestamp, jiff::Timestamp)> = names
        .iter()
        .map(|n| {
            let r = &status(&api, n)["lastRun"];
            (
                r["startTime"].as_str().unwrap().parse().unwrap(),
                r["completionTime"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "runs overlap: {spans:?}");
    }
    op.stop().await;
}

/// Shutdown while runs wait for a slot records nothing for them: no `Interrupted` for a run
/// that never started; the next operator finds them still due.
#[tokio::test]
async fn shutdown_does_not_record_queued_runs_as_interrupted() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(600, Generator::Clean));
    w.braze.inject([Fault::Slow(Duration::from_secs(60)); 2]);
    secrets(&api);
    put_export(&api, &w, "busy", "42", "concurrency: 2", "");
    put_export(&api, &w, "waiting", "42", "", "");
    let op = Operator::start(
        &api,
        Config {
            max_concurrent_runs: 1,
            ..config()
        },
    );
    run_now(&api, "busy", "r1");
    wait_for("busy to run", 10, || {
        (condition(&status(&api, "busy"), "Running")["status"] == "True").then_some(())
    })
    .await;
    run_now(&api, "waiting", "r1");
    wait_for("waiting to queue", 10, || {
        (condition(&status(&api, "waiting"), "Running")["reason"] == "Queued").then_some(())
    })
    .await;
    op.stop().await;
    let s = status(&api, "waiting");
    assert!(s["lastRun"].is_null(), "no run recorded: {s}");
    assert!(
        s["lastHandledRunRequest"].is_null(),
        "the request is still open: {s}"
    );
    assert_eq!(history(&status(&api, "busy")), ["Manual Interrupted"]);

    let op = Operator::start(&api, config());
    let s = wait_ready(&api, "waiting", "Succeeded", 20).await;
    assert_eq!(history(&s), ["Manual Succeeded"]);
    op.stop().await;
}

/// An export deleted and recreated under the same name during a run: the old run stops, and
/// never writes onto the new object.
#[tokio::test]
async fn a_run_never_writes_onto_a_recreated_namesake() {
    let (api, w) = slow_run("reborn", 3000, 30).await;
    let op = Operator::start(&api, config());
    run_now(&api, "reborn", "r1");
    wait_for("sending", 10, || {
        (w.braze.request_count() > 3).then_some(())
    })
    .await;
    api.delete(EXPORTS, NS, "reborn");
    put_export(&api, &w, "reborn", "42", "", "");
    api.patch(EXPORTS, NS, "reborn", json!({"spec": {"suspend": true}}));
    let s = wait_ready(&api, "reborn", "Suspended", 10).await;
    assert!(s["lastRun"].is_null(), "the new object has no run: {s}");
    let sent = w.braze.request_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = status(&api, "reborn");
    assert!(
        s["lastRun"].is_null() && s["history"].as_array().is_none_or(Vec::is_empty),
        "{s}"
    );
    assert!(
        w.braze.request_count() - sent <= 2,
        "the old run stopped: {} more requests",
        w.braze.request_count() - sent
    );
    op.stop().await;
}

/// A run that keeps getting interrupted (three retries in a row) is not retried again before
/// its next scheduled time, and Ready says so.
#[tokio::test]
async fn a_run_that_keeps_crashing_is_not_retried_in_a_loop() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "crashy", "42", "", "");
    let t =
        |secs: i64| (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)).to_string();
    let summary = |trigger: &str, outcome: &str, ago: i64| json!({"startTime": t(ago), "trigger": trigger, "outcome": outcome, "sent": 0, "durationSeconds": 1.0});
    api.patch(
        EXPORTS,
        NS,
        "crashy",
        json!({"status": {
            "conditions": [{"type": "Running", "status": "True", "reason": "Running", "message": "Retry run started", "lastTransitionTime": t(20)}],
            "runner": "gone-pod_00000001",
            "lastRun": {"trigger": "Retry", "startTime": t(20), "outcome": "Running", "rowsRead": 0, "sent": 0, "duplicates": 0, "invalid": 0, "rejected": 0, "failed": 0, "skipped": 0, "requests": 0, "retries": 0, "rateLimited": 0, "errors": [], "message": "running"},
            "history": [summary("Retry", "Interrupted", 60), summary("Retry", "Interrupted", 120), summary("Manual", "Interrupted", 300)]
        }}),
    );
    let op = Operator::start(&api, config());
    let s = wait_ready(&api, "crashy", "Failed", 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s2 = status(&api, "crashy");
    assert_eq!(
        history(&s2),
        [
            "Retry Interrupted",
            "Retry Interrupted",
            "Retry Interrupted",
            "Manual Interrupted"
        ],
        "not retried a fourth time"
    );
    assert_eq!(w.looker.requests_to("/run/json_detail").len(), 0);
    let message = condition(&s, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("not retried again after 3 retries in a row")
            && message.contains("the next run is the scheduled one"),
        "{message}"
    );
    op.stop().await;
}

/// With `--looker-allowed-hosts`, an export pointing elsewhere is `InvalidSpec` naming the
/// field, the host and the list, and its Looker is never called; allowed ones run.
#[tokio::test]
async fn looker_hosts_outside_the_allowlist_are_never_called() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "outside", "42", "", "");
    let op = Operator::start(
        &api,
        Config {
            allowed_hosts: braze_export_operator::looker::AllowedHosts::parse(
                "*.looker.com,*.cloud.looker.com",
            )
            .unwrap(),
            ..config()
        },
    );
    run_now(&api, "outside", "r1");
    let s = wait_ready(&api, "outside", "InvalidSpec", 10).await;
    assert_eq!(
        condition(&s, "Ready")["message"],
        "spec.looker.baseUrl: host 127.0.0.1 is not allowed by this operator (--looker-allowed-hosts *.looker.com,*.cloud.looker.com)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.looker.requests().is_empty(), "Looker was called");
    op.stop().await;

    let op = Operator::start(
        &api,
        Config {
            allowed_hosts: braze_export_operator::looker::AllowedHosts::parse("127.0.0.1").unwrap(),
            ..config()
        },
    );
    assert_eq!(
        wait_ready(&api, "outside", "Succeeded", 20).await["lastRun"]["sent"],
        5
    );
    op.stop().await;
}

/// RBAC changed under a running export: its status writes get 403 from the run's start on.
/// The run's end cannot be recorded; it is given up after a few tries (not retried for as
/// long as the term lasts), counted in `braze_export_status_write_failures_total`, and the
/// export is released: once the refusal is lifted, a run-now runs it again.
#[tokio::test]
async fn a_final_status_the_apiserver_refuses_is_given_up_and_counted() {
    let (api, w) = slow_run("refused", 200, 50).await;
    let op = Operator::start(&api, config());
    run_now(&api, "refused", "r1");
    wait_for("the run", 10, || {
        let s = status(&api, "refused");
        (condition(&s, "Running")["status"] == "True").then_some(())
    })
    .await;
    api.refuse_status_writes(operator::NS, "refused", 403);
    let metric = "braze_export_status_write_failures_total{reason=\"Forbidden\"}";
    wait_for("the final status to be given up", 25, || {
        (op.metric(metric) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(w.delivered_set().len(), 200, "the run itself ended");
    assert_eq!(
        condition(&status(&api, "refused"), "Running")["status"],
        "True",
        "its end could not be recorded"
    );

    api.accept_status_writes(operator::NS, "refused");
    run_now(&api, "refused", "r2");
    let s = wait_for("the run-now after the refusal", 30, || {
        let s = status(&api, "refused");
        (s["lastHandledRunRequest"] == "r2"
            && condition(&s, "Running")["status"] == "False"
            && condition(&s, "Ready")["reason"] == "Succeeded")
            .then_some(s)
    })
    .await;
    assert_eq!(history(&s)[0], "Manual Succeeded", "{s}");
    assert_eq!(w.looker.requests_to("/run/json_detail").len(), 2);
    assert_eq!(op.metric(metric), Some(1.0));
    op.stop().await;
}
