//! Audience sync in the cluster: the controller keeps each export's audience in Secrets owned
//! by it, removes the flag from users who left the Look, holds the removal limit, and lets a
//! run-now with the allow-removal annotation go past it once.

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/operator.rs"]
mod operator;
mod support;

use apiserver::{EXPORTS, FakeApiServer, SECRETS};
use braze_export_operator::sandbox::{Generator, Look};
use operator::*;
use serde_json::{Value, json};
use support::*;

fn segment(w: &World) -> usize {
    w.braze.segment("looker_export", "LOOKER_EXPORT").len()
}

/// The audience Secrets of `name`: owned by the export (its uid), so they go when it goes.
fn audience_secrets(api: &FakeApiServer, name: &str) -> Vec<Value> {
    let uid = api.get(EXPORTS, NS, name).unwrap()["metadata"]["uid"].clone();
    api.list(SECRETS)
        .into_iter()
        .filter(|s| {
            s["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|o| {
                    o.iter()
                        .any(|r| r["uid"] == uid && r["kind"] == "BrazeExport")
                })
        })
        .collect()
}

#[tokio::test]
async fn remove_takes_the_flag_off_users_who_left_within_the_limit() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(300, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    let op = Operator::start(&api, config());

    run_now(&api, "mirror", "r1");
    let s = wait_ready(&api, "mirror", "Succeeded", 20).await;
    assert_eq!(s["lastRun"]["sent"], 300);
    assert_eq!(segment(&w), 300);
    let stored = audience_secrets(&api, "mirror");
    assert!(
        !stored.is_empty(),
        "the audience is stored in Secrets owned by the export"
    );
    assert!(
        stored
            .iter()
            .all(|s| s["data"].to_string().len() < 1024 * 1024),
        "each part under the object limit"
    );

    // 30 of 300 left: 10%, within the default limit of 20%.
    w.looker.add_look("42", Look::users(270, Generator::Clean));
    run_now(&api, "mirror", "r2");
    let s = wait_for("the second run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r2" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["removed"], 30, "{s}");
    assert_eq!(segment(&w), 270);

    // 170 of 270 would leave: over the limit, nobody is removed.
    w.looker.add_look("42", Look::users(100, Generator::Clean));
    run_now(&api, "mirror", "r3");
    let s = wait_ready(&api, "mirror", "PartiallySucceeded", 20).await;
    let errors = s["lastRun"]["errors"].as_array().unwrap();
    let limit = errors
        .iter()
        .find(|e| e["reason"] == "RemovalLimitExceeded")
        .unwrap_or_else(|| panic!("no RemovalLimitExceeded: {s}"));
    assert!(
        limit["message"].as_str().unwrap().contains("170"),
        "{limit}"
    );
    assert_eq!(segment(&w), 270, "nobody removed");

    // Allowed once with the annotation repeating the run-now value.
    api.patch(
        EXPORTS,
        NS,
        "mirror",
        json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "r4", "looker-braze.dev/allow-removal": "r4"}}}),
    );
    let s = wait_for("the allowed run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r4" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["removed"], 170, "{s}");
    assert_eq!(segment(&w), 100);
    op.stop().await;
}

/// `delta: true` in the cluster: users flagged by the last successful run are not sent again.
#[tokio::test]
async fn delta_sends_only_new_users() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(200, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "delta", "42", "removal: Remove\ndelta: true", "");
    let op = Operator::start(&api, config());
    run_now(&api, "delta", "r1");
    wait_ready(&api, "delta", "Succeeded", 20).await;
    w.looker.add_look("42", Look::users(210, Generator::Clean));
    let before = w.braze.accepted_count();
    run_now(&api, "delta", "r2");
    let s = wait_for("the delta run", 20, || {
        let s = status(&api, "delta");
        (s["lastHandledRunRequest"] == "r2" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    assert_eq!(
        (
            s["lastRun"]["sent"].as_u64(),
            s["lastRun"]["unchanged"].as_u64()
        ),
        (Some(10), Some(200)),
        "{s}"
    );
    assert_eq!(w.braze.accepted_count() - before, 10);
    assert_eq!(segment(&w), 210);
    op.stop().await;
}
