//! Audience sync in the cluster: the controller keeps each export's audience in Secrets owned
//! by it, removes the flag from users who left the Look, holds the removal limit, and lets a
//! run-now with the allow-removal annotation go past it once.

#[path = "support/fake.rs"]
mod fake;
#[path = "support/operator.rs"]
mod operator;
mod support;

use braze_export_operator::controller::audience_store::ROLE_LABEL;
use braze_export_operator::sandbox::{Generator, Look};
use fake::Start as _;
use fake_apiserver::{EVENTS, EXPORTS, FakeApiServer, SECRETS};
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

/// Export `mirror` (`removal: Remove` plus `extra_braze`, `cleanupOnDelete: true`) on a Look of
/// `users`, run once by an operator with `config`: its audience is stored and flagged.
async fn flagged_with_cleanup(
    users: u64,
    extra_braze: &str,
    config: braze_export_operator::controller::Config,
) -> (FakeApiServer, World, Operator) {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker
        .add_look("42", Look::users(users, Generator::Clean));
    secrets(&api);
    let braze = format!("removal: Remove\n{extra_braze}");
    put_export(&api, &w, "mirror", "42", &braze, "cleanupOnDelete: true");
    let op = Operator::start(&api, config);
    run_now(&api, "mirror", "r1");
    wait_ready(&api, "mirror", "Succeeded", 20).await;
    (api, w, op)
}

/// Sets `cleanupOnDelete: false` on `name` and waits for its finalizer to go.
async fn turn_cleanup_off(api: &FakeApiServer, name: &str) {
    api.patch(
        EXPORTS,
        NS,
        name,
        json!({"spec": {"cleanupOnDelete": false}}),
    );
    wait_for("the finalizer to go", 10, || {
        finalizers(api, name)?.is_null().then_some(())
    })
    .await;
}

fn finalizers(api: &FakeApiServer, name: &str) -> Option<Value> {
    api.get(EXPORTS, NS, name)
        .map(|e| e["metadata"]["finalizers"].clone())
}

/// `cleanupOnDelete: true`: the export holds a finalizer; deleting it removes its flag from
/// every user of its stored audience (Looker is not read), deletes the audience Secrets, and
/// only then lets the export go.
#[tokio::test]
async fn deleting_an_export_with_cleanup_removes_its_flag_first() {
    let (api, w, op) = flagged_with_cleanup(300, "", config()).await;
    assert_eq!(
        finalizers(&api, "mirror"),
        Some(json!(["looker-braze.dev/cleanup"]))
    );
    assert_eq!(segment(&w), 300);
    let someone = w
        .braze
        .segment("looker_export", "LOOKER_EXPORT")
        .into_iter()
        .next()
        .unwrap();
    assert!(!audience_secrets(&api, "mirror").is_empty());
    let uid = api.get(EXPORTS, NS, "mirror").unwrap()["metadata"]["uid"].clone();
    let looker_calls = w.looker.requests().len();

    api.delete(EXPORTS, NS, "mirror");
    assert!(
        api.get(EXPORTS, NS, "mirror").is_some(),
        "the finalizer holds the deletion"
    );

    wait_for("the export to go", 20, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    assert_eq!(segment(&w), 0, "the flag is off every user");
    assert_eq!(
        w.braze.array(&someone, "looker_export"),
        Some(vec![]),
        "the user stays in Braze; only the value goes"
    );
    assert_eq!(
        w.looker.requests().len(),
        looker_calls,
        "Looker is not read"
    );
    let left: Vec<Value> = api
        .list(SECRETS)
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["looker-braze.dev/audience-of"] == uid)
        .collect();
    assert!(
        left.is_empty(),
        "the audience Secrets are deleted: {left:?}"
    );
    let cleaned = events(&api, "mirror")
        .into_iter()
        .find(|(_, reason, _)| reason == "CleanedUp")
        .expect("a CleanedUp Event");
    assert_eq!(cleaned.0, "Normal");
    assert_eq!(
        cleaned.2,
        "removed LOOKER_EXPORT from looker_export for all 300 users of the stored audience"
    );
    assert_eq!(
        op.metric("braze_export_rows_total{result=\"removed\"}"),
        Some(300.0)
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    op.stop().await;
}

/// A deletion never hangs: when Braze refuses the key, the finalizer goes at once, and the
/// Warning says how many users keep the flag, never the key.
#[tokio::test]
async fn a_deletion_does_not_wait_on_a_refused_key() {
    let (api, w, op) = flagged_with_cleanup(120, "", config()).await;
    const REVOKED: &str = "revoked-key-5f3a9c";
    w.braze.forbid_key(REVOKED);
    api.put_secret(NS, "braze-api", &[("api_key", REVOKED)]);

    let deleted = std::time::Instant::now();
    api.delete(EXPORTS, NS, "mirror");
    wait_for("the export to go", 10, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    assert!(deleted.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(segment(&w), 120, "nobody lost the flag");
    let (kind, _, note) = events(&api, "mirror")
        .into_iter()
        .find(|(_, reason, _)| reason == "CleanupIncomplete")
        .expect("a CleanupIncomplete Event");
    assert_eq!(kind, "Warning");
    assert!(
        note.starts_with(
            "removed LOOKER_EXPORT from looker_export for 0 of the 120 users of the stored audience; 120 may keep it ("
        ),
        "{note}"
    );
    let everything = format!("{:?}", api.list(EVENTS));
    assert!(
        !everything.contains(REVOKED),
        "the key never reaches an Event"
    );
    op.stop().await;
}

/// Export `mirror` (`Remove`, with `extra_braze` and `extra_spec`) on a 400-user Look, sent
/// slowly (100 ms a request of 10 users, one at a time), its run-now run `r1` under way: at
/// least 30 users flagged.
async fn mid_run(extra_braze: &str, extra_spec: &str) -> (FakeApiServer, World, Operator) {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(400, Generator::Clean));
    w.braze.set_latency(
        std::time::Duration::from_millis(100),
        std::time::Duration::ZERO,
    );
    secrets(&api);
    let braze = format!("removal: Remove\nbatchSize: 10\nconcurrency: 1\n{extra_braze}");
    put_export(&api, &w, "mirror", "42", braze.trim_end(), extra_spec);
    let op = Operator::start(&api, config());
    run_now(&api, "mirror", "r1");
    wait_for("some users flagged", 20, || {
        (segment(&w) >= 30).then_some(())
    })
    .await;
    (api, w, op)
}

/// An export deleted mid-run: the run stops and saves whom it flagged, then the cleanup
/// removes the flag from them too.
#[tokio::test]
async fn deleting_mid_run_cleans_up_what_the_run_flagged() {
    let (api, w, op) = mid_run("", "cleanupOnDelete: true").await;
    api.delete(EXPORTS, NS, "mirror");
    wait_for("the export to go", 30, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    let flagged = segment(&w);
    assert_eq!(flagged, 0, "every user the run flagged lost the flag");
    assert!(
        w.braze.accepted_count() < 400 + 400,
        "the run stopped: {} objects",
        w.braze.accepted_count()
    );
    assert!(
        events(&api, "mirror")
            .iter()
            .any(|(_, reason, _)| reason == "CleanedUp"),
        "{:?}",
        events(&api, "mirror")
    );
    op.stop().await;
}

/// The finalizer follows the spec: turned off, it goes (a deletion is then immediate); and an
/// export this version cannot decode is never held by it.
#[tokio::test]
async fn the_finalizer_follows_the_spec_and_never_holds_an_unreadable_export() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(30, Generator::Clean));
    secrets(&api);
    let mut newer = serde_json::to_value(
        <braze_export_operator::spec::BrazeExport as kube::CustomResourceExt>::crd(),
    )
    .unwrap();
    newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["braze"]["properties"]["audienceMode"] = json!({"type": "string"});
    api.set_crd(newer);
    put_export(
        &api,
        &w,
        "toggled",
        "42",
        "removal: Remove",
        "cleanupOnDelete: true",
    );
    let mut unreadable = export_object(
        &w,
        "unreadable",
        "42",
        "removal: Remove\naudienceMode: Mirror",
        "cleanupOnDelete: true",
    );
    // As an earlier operator version left it.
    unreadable["metadata"]["finalizers"] = json!(["looker-braze.dev/cleanup"]);
    api.put(EXPORTS, unreadable);
    let op = Operator::start(&api, config());
    wait_for("the finalizer", 10, || {
        (finalizers(&api, "toggled")? == json!(["looker-braze.dev/cleanup"])).then_some(())
    })
    .await;
    run_now(&api, "toggled", "r1");
    wait_ready(&api, "toggled", "Succeeded", 20).await;
    let stored = audience_secrets(&api, "toggled");
    assert!(!stored.is_empty());
    assert!(
        stored
            .iter()
            .all(|s| s["metadata"]["finalizers"] == json!(["looker-braze.dev/cleanup"])),
        "its audience is held for the cleanup too"
    );
    turn_cleanup_off(&api, "toggled").await;
    assert!(
        audience_secrets(&api, "toggled")
            .iter()
            .all(|s| s["metadata"]["finalizers"].is_null()),
        "its audience is let go too"
    );
    // On again: the audience saved meanwhile is held again before any deletion can take it.
    api.patch(
        EXPORTS,
        NS,
        "toggled",
        json!({"spec": {"cleanupOnDelete": true}}),
    );
    wait_for("the audience held again", 10, || {
        audience_secrets(&api, "toggled")
            .iter()
            .all(|s| s["metadata"]["finalizers"] == json!(["looker-braze.dev/cleanup"]))
            .then_some(())
    })
    .await;
    assert_eq!(
        finalizers(&api, "toggled"),
        Some(json!(["looker-braze.dev/cleanup"]))
    );
    turn_cleanup_off(&api, "toggled").await;
    api.delete(EXPORTS, NS, "toggled");
    assert!(api.get(EXPORTS, NS, "toggled").is_none());
    assert!(
        api.list(SECRETS)
            .iter()
            .all(|s| s["metadata"]["labels"]["looker-braze.dev/audience-of"].is_null()),
        "its audience went with it"
    );
    assert_eq!(segment(&w), 30, "turned off: no cleanup");

    api.delete(EXPORTS, NS, "unreadable");
    wait_for("the unreadable export to go", 10, || {
        api.get(EXPORTS, NS, "unreadable").is_none().then_some(())
    })
    .await;
    op.stop().await;
}

/// The finalizers on Secret `name` (`Null` when none; `None` when it is gone).
fn secret_finalizers(api: &FakeApiServer, name: &str) -> Option<Value> {
    api.get(SECRETS, NS, name)
        .map(|s| s["metadata"]["finalizers"].clone())
}

/// Waits until Secret `name` carries the cleanup finalizer (`held`) or none.
async fn wait_key(api: &FakeApiServer, name: &str, held: bool) {
    let want = if held {
        json!(["looker-braze.dev/cleanup"])
    } else {
        Value::Null
    };
    wait_for(&format!("{name} held: {held}"), 10, || {
        (secret_finalizers(api, name)? == want).then_some(())
    })
    .await;
}

/// The Braze key Secret is held with the cleanup finalizer while an export with
/// `cleanupOnDelete` names it, and shared: let go only once no such export names it (one
/// turned the field off, the other named another Secret), and the other one's after its
/// cleanup ended.
#[tokio::test]
async fn a_shared_braze_key_is_held_until_no_cleanup_needs_it() {
    let (api, w, op) = flagged_with_cleanup(20, "", config()).await;
    wait_key(&api, "braze-api", true).await;
    put_export(
        &api,
        &w,
        "other",
        "42",
        "removal: Remove\nexportName: OTHER",
        "cleanupOnDelete: true",
    );
    run_now(&api, "other", "r1");
    wait_ready(&api, "other", "Succeeded", 20).await;

    turn_cleanup_off(&api, "mirror").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        secret_finalizers(&api, "braze-api"),
        Some(json!(["looker-braze.dev/cleanup"])),
        "other still names it"
    );

    api.put_secret(NS, "braze-api-2", &[("api_key", API_KEY)]);
    api.patch(
        EXPORTS,
        NS,
        "other",
        json!({"spec": {"braze": {"apiKeySecretRef": {"name": "braze-api-2"}}}}),
    );
    wait_key(&api, "braze-api-2", true).await;
    wait_key(&api, "braze-api", false).await;

    assert_eq!(segment_of(&w, "OTHER"), 20);
    api.delete(EXPORTS, NS, "other");
    wait_for("the export to go", 20, || {
        api.get(EXPORTS, NS, "other").is_none().then_some(())
    })
    .await;
    assert_eq!(segment_of(&w, "OTHER"), 0, "cleaned up with the held key");
    wait_key(&api, "braze-api-2", false).await;
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    op.stop().await;
}

fn segment_of(w: &World, value: &str) -> usize {
    w.braze.segment("looker_export", value).len()
}

/// A cleanup that takes too long is stopped at `cleanup_timeout`: the export goes, and the
/// Warning says how many users keep the flag.
#[tokio::test]
async fn a_slow_cleanup_is_bounded() {
    let config = braze_export_operator::controller::Config {
        cleanup_timeout: std::time::Duration::from_secs(1),
        ..config()
    };
    let (api, w, op) = flagged_with_cleanup(200, "batchSize: 10\nconcurrency: 1", config).await;
    w.braze.set_latency(
        std::time::Duration::from_millis(400),
        std::time::Duration::ZERO,
    );
    api.delete(EXPORTS, NS, "mirror");
    let cleaning = wait_for("the cleanup to show", 10, || {
        let s = api.get(EXPORTS, NS, "mirror")?["status"].clone();
        (condition(&s, "Running")["reason"] == "CleaningUp").then_some(s)
    })
    .await;
    assert_eq!(
        condition(&cleaning, "Running")["message"],
        "removing LOOKER_EXPORT from looker_export for the 200 users of the stored audience before the export is deleted"
    );
    assert_eq!(cleaning["lastRun"]["trigger"], "Deletion");
    wait_for("the export to go", 10, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    let (_, _, note) = events(&api, "mirror")
        .into_iter()
        .find(|(_, reason, _)| reason == "CleanupIncomplete")
        .expect("a CleanupIncomplete Event");
    let unconfirmed: usize = note
        .strip_suffix(" may keep it (the cleanup ran out of time)")
        .and_then(|n| n.rsplit_once("; "))
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    let kept = segment(&w);
    assert!(
        kept > 0 && kept <= unconfirmed && unconfirmed < 200,
        "{kept} kept, {unconfirmed} unconfirmed: {note}"
    );
    op.stop().await;
}

/// A foreground deletion (`kubectl delete --cascade=foreground`, Argo CD's prune) deletes
/// what the export owns first: its audience Secrets stay, held by the same finalizer, until
/// the cleanup has read them.
#[tokio::test]
async fn a_foreground_deletion_still_cleans_up() {
    let (api, w, op) = flagged_with_cleanup(150, "", config()).await;
    assert_eq!(segment(&w), 150);
    api.delete_foreground(EXPORTS, NS, "mirror");
    wait_for("the export to go", 20, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    assert_eq!(segment(&w), 0);
    assert!(
        api.list(SECRETS)
            .iter()
            .all(|s| s["metadata"]["labels"]["looker-braze.dev/audience-of"].is_null()),
        "no audience Secret is left behind"
    );
    op.stop().await;
}

/// A lagging watch still shows the deleted export (deleting, finalizer held) after the
/// cleanup let it go: no second cleanup, one Event, the removals counted once.
#[tokio::test]
async fn a_lagging_watch_never_cleans_up_twice() {
    let (api, w, op) = flagged_with_cleanup(100, "", config()).await;
    api.set_watch_lag(std::time::Duration::from_secs(4));
    api.delete(EXPORTS, NS, "mirror");
    wait_for("the export to go", 20, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    // Past the next look at the export, and the lag.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let told: Vec<_> = events(&api, "mirror")
        .into_iter()
        .filter(|(_, reason, _)| reason.starts_with("Clean"))
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(
        told[0].2,
        "removed LOOKER_EXPORT from looker_export for all 100 users of the stored audience"
    );
    // A repeat would be told as a series of the same Event.
    let series: Vec<Value> = api
        .list(EVENTS)
        .into_iter()
        .filter(|e| e["reason"] == "CleanedUp")
        .map(|e| e["series"].clone())
        .collect();
    assert_eq!(series, [Value::Null], "told once");
    assert_eq!(
        op.metric("braze_export_rows_total{result=\"removed\"}"),
        Some(100.0)
    );
    assert_eq!(segment(&w), 0);
    op.stop().await;
}

/// The way back from a stored audience that cannot be used (here, of another identifier
/// type): a run-now with `looker-braze.dev/discard-audience` repeating its value starts
/// afresh, once, and the next run uses the new audience.
#[tokio::test]
async fn a_discard_request_starts_a_new_audience() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(300, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    let op = Operator::start(&api, config());
    run_now(&api, "mirror", "r1");
    wait_ready(&api, "mirror", "Succeeded", 20).await;

    // Another identifier type: the stored audience is refused.
    api.patch(
        EXPORTS,
        NS,
        "mirror",
        json!({"spec": {"braze": {"identifier": "braze_id"}}}),
    );
    run_now(&api, "mirror", "r2");
    let s = wait_for("the refused run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r2" && s["lastRun"]["outcome"] == "Failed").then_some(s)
    })
    .await;
    assert_eq!(
        s["lastRun"]["errors"][0]["reason"], "AudienceMismatch",
        "{s}"
    );

    // Discarded on request: a first run, sending everyone and removing nobody.
    w.looker.add_look("42", Look::users(250, Generator::Clean));
    let before = w.braze.accepted_count();
    api.patch(
        EXPORTS,
        NS,
        "mirror",
        json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "r3", "looker-braze.dev/discard-audience": "r3"}}}),
    );
    let s = wait_for("the discarding run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r3" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    let last = &s["lastRun"];
    assert_eq!(
        (&last["sent"], &last["removed"]),
        (&json!(250), &json!(0)),
        "{s}"
    );
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .ends_with("; the stored audience was discarded on request"),
        "{s}"
    );
    assert_eq!(w.braze.accepted_count() - before, 250);
    let discarded = wait_event(&api, "mirror", "AudienceDiscarded", 10).await;
    assert_eq!(discarded.0, "Normal");
    assert!(discarded.2.contains("r3"), "{discarded:?}");

    // The next run uses the new audience (the annotation answered r3 only).
    w.looker.add_look("42", Look::users(240, Generator::Clean));
    run_now(&api, "mirror", "r4");
    let s = wait_for("the next run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r4" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    assert_eq!(
        (&s["lastRun"]["removed"], &s["lastRun"]["added"]),
        (&json!(10), &json!(0)),
        "{s}"
    );
    assert!(
        !s["lastRun"]["message"]
            .as_str()
            .unwrap()
            .contains("discarded"),
        "{s}"
    );
    op.stop().await;
}

/// A namesake deleted and recreated mid-run (`kubectl replace --force`, Argo CD's
/// `Replace=true`): the old run's late save never writes the new export's audience, whose
/// first run then reads and stores its own.
#[tokio::test]
async fn a_recreated_namesake_keeps_its_own_audience() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(400, Generator::Clean));
    w.braze.set_latency(
        std::time::Duration::from_millis(50),
        std::time::Duration::ZERO,
    );
    secrets(&api);
    let slow = "removal: Remove\nbatchSize: 10\nconcurrency: 1";
    put_export(&api, &w, "mirror", "42", slow, "");
    let op = Operator::start(&api, config());
    run_now(&api, "mirror", "r1");
    wait_for("some users flagged", 20, || {
        (segment(&w) >= 30).then_some(())
    })
    .await;
    let old_uid = api.get(EXPORTS, NS, "mirror").unwrap()["metadata"]["uid"].clone();
    api.delete(EXPORTS, NS, "mirror");
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    let new_uid = api.get(EXPORTS, NS, "mirror").unwrap()["metadata"]["uid"].clone();
    assert_ne!(old_uid, new_uid);
    run_now(&api, "mirror", "n1");
    let s = wait_for("the new export's run", 30, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "n1" && s["lastRun"]["completionTime"].is_string())
            .then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    let manifest = api.get(SECRETS, NS, "mirror-audience").expect("a manifest");
    assert_eq!(
        manifest["metadata"]["labels"]["looker-braze.dev/audience-of"], new_uid,
        "{manifest}"
    );
    let foreign: Vec<_> = api
        .list(SECRETS)
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["looker-braze.dev/audience-of"] == old_uid)
        .collect();
    assert!(foreign.is_empty(), "{foreign:?}");
    // Its next run uses that audience.
    w.looker.add_look("42", Look::users(390, Generator::Clean));
    run_now(&api, "mirror", "n2");
    let s = wait_for("the next run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "n2" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["removed"], 10, "{s}");
    op.stop().await;
}

/// A run stopped by a shutdown (a rollout) still saves whom it flagged: this instance holds
/// the Lease until its runs are recorded, so its write is not fenced, and the next run can
/// take the flag off those of them who left.
#[tokio::test]
async fn a_run_stopped_by_a_rollout_still_saves_whom_it_flagged() {
    let (api, w, op) = mid_run("removalLimitPercent: 100", "").await;
    op.stop().await;
    let flagged = segment(&w);
    assert!(flagged < 400, "the run was stopped: {flagged} flagged");
    assert!(
        !audience_secrets(&api, "mirror").is_empty(),
        "the stopped run saved its audience"
    );

    // Everyone but the first 10 users leaves the Look.
    w.braze
        .set_latency(std::time::Duration::ZERO, std::time::Duration::ZERO);
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    let op = Operator::start(&api, config());
    run_now(&api, "mirror", "r2");
    wait_for("the next run", 30, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r2"
            && !s["lastRun"]["outcome"].is_null()
            && s["lastRun"]["outcome"] != "Running")
            .then_some(())
    })
    .await;
    assert_eq!(
        segment(&w),
        10,
        "those the stopped run flagged and who left lost the flag: {}",
        status(&api, "mirror")["lastRun"]
    );
    op.stop().await;
}

/// A `results: Table` run that read as many rows as the Look's row limit removes nobody, and
/// `kubectl get bzx` says so: Ready False, reason PartiallySucceeded, the message naming the
/// limit and the fix.
#[tokio::test]
async fn a_look_at_its_row_limit_is_partially_succeeded_in_the_cluster() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    let mut first = Look::users(300, Generator::Clean);
    first.table_limit = 1000;
    w.looker.add_look("42", first);
    secrets(&api);
    put_export(&api, &w, "signups", "42", "removal: Remove", "");
    let op = Operator::start(&api, config());
    run_now(&api, "signups", "r1");
    let s = wait_ready(&api, "signups", "Succeeded", 20).await;
    assert_eq!(s["lastRun"]["sent"], 300);

    // 400 users now, but the Look's row limit is 250: 50 of the 300 look gone, and are not.
    let mut cut = Look::users(400, Generator::Clean);
    cut.table_limit = 250;
    w.looker.add_look("42", cut);
    run_now(&api, "signups", "r2");
    let s = wait_ready(&api, "signups", "PartiallySucceeded", 20).await;
    let why = "Look 42 returned its row limit (250 rows): it may be cut, so nobody was removed; set spec.looker.results: All, or raise the Look's row limit in Looker";
    let ready = condition(&s, "Ready");
    assert_eq!(ready["status"], "False", "{s}");
    assert!(ready["message"].as_str().unwrap().contains(why), "{ready}");
    let run = &s["lastRun"];
    assert_eq!(
        (
            &run["sent"],
            &run["removed"],
            &run["removalWithheld"],
            &run["outcome"]
        ),
        (
            &json!(250),
            &json!(0),
            &json!(50),
            &json!("PartiallySucceeded")
        ),
        "{s}"
    );
    assert_eq!(
        run["message"],
        format!("250 users flagged (0 new), 50 removals withheld at the Look's row limit; {why}")
    );
    assert_eq!(run["errors"][0]["reason"], "LookLimitReached");
    assert_eq!(segment(&w), 300, "nobody removed");
    op.stop().await;
}

/// A run whose audience cannot be saved is not `Succeeded`: it says what that means, the
/// metric counts it, and the previous audience stays.
#[tokio::test]
async fn a_run_whose_audience_cannot_be_saved_is_partially_succeeded() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(50, Generator::Clean));
    secrets(&api);
    put_export(
        &api,
        &w,
        "mirror",
        "42",
        "removal: Remove\nremovalLimitPercent: 100",
        "",
    );
    // A ResourceQuota with room for one more Secret: the run's pending record of its 50
    // new users, not the audience's part and manifest.
    api.set_quota(NS, SECRETS, 3);
    let op = Operator::start(&api, config());
    run_now(&api, "mirror", "r1");
    let s = wait_ready(&api, "mirror", "PartiallySucceeded", 20).await;
    let run = &s["lastRun"];
    assert_eq!(run["sent"], 50, "the flags went out: {run}");
    assert_eq!(run["errors"][0]["reason"], "AudienceNotSaved", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.starts_with("50 users flagged")
            && message.contains(
                "the audience of this run could not be saved (the audience Secrets: secrets \"mirror-audience-1-0\" is forbidden: exceeded quota: test-quota, requested: count/secrets=1, used: count/secrets=3, limited: count/secrets=3)"
            )
            && message.ends_with(
                "the previous one stays, with the users this run flagged for the first time recorded as pending, so the next run still removes those who left (and may send some users again)"
            ),
        "{message}"
    );
    assert_eq!(
        op.metric("braze_export_audience_save_failures_total"),
        Some(1.0)
    );
    assert!(
        events(&api, "mirror")
            .iter()
            .any(|(kind, reason, _)| kind == "Warning" && reason == "AudienceNotSaved"),
        "{:?}",
        events(&api, "mirror")
    );
    let kept: Vec<String> = audience_secrets(&api, "mirror")
        .iter()
        .map(|s| {
            s["metadata"]["labels"][ROLE_LABEL]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kept, ["pending"], "nothing half-saved, the record kept");

    // The quota is raised; ten users left meanwhile. The audience was never saved, and still
    // they lose the flag: the record named them.
    api.set_quota(NS, SECRETS, 100);
    w.looker.add_look("42", Look::users(40, Generator::Clean));
    run_now(&api, "mirror", "r2");
    let s = wait_for("the next run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r2" && s["lastRun"]["outcome"] == "Succeeded").then_some(s)
    })
    .await;
    let run = &s["lastRun"];
    assert_eq!(
        (run["removed"].as_u64(), run["sent"].as_u64()),
        (Some(10), Some(40)),
        "{run}"
    );
    assert_eq!(segment(&w), 40);
    let roles: Vec<String> = audience_secrets(&api, "mirror")
        .iter()
        .map(|s| {
            s["metadata"]["labels"][ROLE_LABEL]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(!roles.iter().any(|r| r == "pending"), "{roles:?}");
    op.stop().await;
}

/// One owner per flag: two `Remove` exports on one flag (workspace, attribute, value) would
/// take it off each other's users. The later one is `FlagConflict`, naming the first, and
/// never runs; the first runs as usual; once the later one has its own `exportName` it runs.
#[tokio::test]
async fn a_second_remover_of_one_flag_is_refused_until_it_has_its_own() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(100, Generator::Clean));
    w.looker.add_look("43", Look::users(50, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "a-first", "42", "removal: Remove", "");
    // Ties in creationTimestamp go by name: `a-first` is first either way.
    put_export(&api, &w, "b-later", "43", "removal: Remove", "");
    let op = Operator::start(&api, config());
    run_now(&api, "b-later", "r1");
    run_now(&api, "a-first", "r1");

    let s = wait_ready(&api, "b-later", "FlagConflict", 20).await;
    let message = condition(&s, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with(&format!(
            "export {NS}/a-first already removes looker_export=LOOKER_EXPORT with Secret {NS}/braze-api (key api_key)"
        )),
        "{message}"
    );
    assert!(
        message.ends_with("give one of them a different spec.braze.exportName, or set one to spec.braze.removal: Keep"),
        "{message}"
    );
    let s = wait_ready(&api, "a-first", "Succeeded", 20).await;
    assert_eq!(s["lastRun"]["sent"], 100, "{s}");
    assert_eq!(segment(&w), 100);
    let refused = status(&api, "b-later");
    assert!(
        refused["lastRun"].is_null() && refused["lastHandledRunRequest"].is_null(),
        "the later one never ran: {refused}"
    );
    assert_eq!(
        condition(&refused, "Ready")["reason"],
        "FlagConflict",
        "{refused}"
    );
    let told: Vec<Value> = api
        .list(EVENTS)
        .into_iter()
        .filter(|e| e["reason"] == "FlagConflict")
        .collect();
    assert_eq!(told.len(), 1, "told once: {told:?}");
    assert_eq!(told[0]["regarding"]["name"], "b-later");

    // Its own flag: it runs the request it was refused.
    api.patch(
        EXPORTS,
        NS,
        "b-later",
        json!({"spec": {"braze": {"exportName": "LATER"}}}),
    );
    let s = wait_ready(&api, "b-later", "Succeeded", 20).await;
    assert_eq!(s["lastRun"]["sent"], 50, "{s}");
    assert_eq!(w.braze.segment("looker_export", "LATER").len(), 50);
    assert_eq!(segment(&w), 100, "the first export's flag is untouched");
    op.stop().await;
}
