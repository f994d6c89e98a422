//! The controller with its audiences in an S3-compatible bucket (a real S3 server on
//! loopback, s3s-fs), holding the chart's rights for that store (Secrets: `get` alone): a
//! run stores its audience under the export's uid and the next reads it back to remove who
//! left; a bucket that refuses writes or fails leaves the previous audience, told as
//! `AudienceNotSaved` or a load failure naming the object, never a key nor a user. And the
//! Secrets store's budget: a larger audience is not saved, and the message names the bucket
//! option.

#[path = "support/bucket.rs"]
mod bucket;
#[path = "support/fake.rs"]
mod fake;
#[path = "support/operator.rs"]
mod operator;
mod support;

use braze_export_operator::controller::Config;
use braze_export_operator::controller::audiences::AudienceStore;
use braze_export_operator::sandbox::{Generator, Look};
use bucket::*;
use fake::Start as _;
use fake_apiserver::{EXPORTS, FakeApiServer, SECRETS};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use operator::*;
use support::*;

fn segment(w: &World) -> usize {
    w.braze.segment("looker_export", "LOOKER_EXPORT").len()
}

fn uid(api: &FakeApiServer, name: &str) -> String {
    api.get(EXPORTS, NS, name).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn bucket_config(s3: &S3Server) -> Config {
    Config {
        audience_store: AudienceStore::Bucket(s3.bucket("prod")),
        ..config()
    }
}

/// The objects of generation `g` in force for export `uid`.
fn generation(uid: &str, g: u64) -> Vec<String> {
    vec![
        format!("prod/{uid}/audience-{g:020}"),
        format!("prod/{uid}/manifest.json"),
    ]
}

/// A run-now `value` and its end.
async fn run(api: &FakeApiServer, name: &str, value: &str) -> serde_json::Value {
    run_now(api, name, value);
    wait_for(&format!("run {value}"), 30, || {
        let s = status(api, name);
        (s["lastHandledRunRequest"] == value
            && condition(&s, "Running")["status"] == "False"
            && s["lastRun"]["completionTime"].is_string())
        .then_some(s)
    })
    .await
}

/// Whatever a user can read of the export (status, Events) and the Secrets: no key, no user.
fn assert_nothing_leaks(api: &FakeApiServer, name: &str) {
    let mut seen = status(api, name).to_string();
    for (_, _, note) in events(api, name) {
        seen.push_str(&note);
    }
    for secret in [ACCESS_KEY, SECRET_KEY, "user-0000001", "user-0000299"] {
        assert!(!seen.contains(secret), "{secret} in {seen}");
    }
}

#[tokio::test]
async fn a_run_keeps_its_audience_in_the_bucket_and_the_next_run_reads_it_back() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(300, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    let client = api.client_with_rules(chart_rules_for(ChartStore::BucketWithoutKeyHold));
    let op = Operator::start_with(client, bucket_config(&s3));
    let uid = uid(&api, "mirror");

    let s = run(&api, "mirror", "r1").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    assert_eq!(s["lastRun"]["sent"], 300);
    assert_eq!(
        s3.objects(),
        generation(&uid, 1),
        "the pending records went too"
    );
    assert_eq!(
        api.list(SECRETS).len(),
        2,
        "no Secret but the credentials: the operator may only read Secrets"
    );

    // 30 left: the stored audience, read back from the bucket, says who.
    w.looker.add_look("42", Look::users(270, Generator::Clean));
    let s = run(&api, "mirror", "r2").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    assert_eq!(s["lastRun"]["removed"], 30, "{s}");
    assert_eq!(segment(&w), 270);
    assert_eq!(s3.objects(), generation(&uid, 2));
    assert_nothing_leaks(&api, "mirror");
    op.stop().await;
}

#[tokio::test]
async fn a_bucket_that_refuses_or_fails_keeps_the_previous_audience_and_says_which_object() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(300, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    let client = api.client_with_rules(chart_rules_for(ChartStore::Bucket));
    let op = Operator::start_with(client, bucket_config(&s3));
    let uid = uid(&api, "mirror");
    let s = run(&api, "mirror", "r1").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");

    // A policy that refuses writes: the run's flags go out, its audience is not saved.
    s3.set_fault(Some(Fault::RefuseWrites));
    w.looker.add_look("42", Look::users(290, Generator::Clean));
    let s = run(&api, "mirror", "r2").await;
    let last = &s["lastRun"];
    assert_eq!(last["outcome"], "PartiallySucceeded", "{s}");
    assert_eq!(condition(&s, "Ready")["reason"], "PartiallySucceeded");
    assert_eq!(last["errors"][0]["reason"], "AudienceNotSaved", "{last}");
    let why = format!(
        "cannot write s3://audiences/prod/{uid}/audience-00000000000000000002: access denied (403)"
    );
    assert!(last["message"].as_str().unwrap().contains(&why), "{last}");
    let (kind, _, note) = wait_event(&api, "mirror", "AudienceNotSaved", 10).await;
    assert_eq!(kind, "Warning");
    assert!(note.contains(&why), "{note}");
    assert_eq!(
        s3.objects(),
        generation(&uid, 1),
        "the previous audience stays"
    );

    // Unavailable: the stored audience cannot be read, so nothing is sent.
    s3.set_fault(Some(Fault::Unavailable));
    let before = w.braze.accepted_count();
    let s = run(&api, "mirror", "r3").await;
    assert_eq!(s["lastRun"]["outcome"], "Failed", "{s}");
    let message = s["lastRun"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "cannot read s3://audiences/prod/{uid}/manifest.json: the server answered 503"
        )),
        "{message}"
    );
    assert_eq!(w.braze.accepted_count(), before, "nothing sent");

    // Back: the previous audience (300) is still the one in force, and 10 left of it.
    s3.set_fault(None);
    let s = run(&api, "mirror", "r4").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    assert_eq!(s["lastRun"]["removed"], 10, "{s}");
    assert_eq!(s3.objects(), generation(&uid, 2));
    assert_nothing_leaks(&api, "mirror");
    op.stop().await;
}

/// Deleting an export with `cleanupOnDelete` removes its flag from the audience read from
/// the bucket, then deletes its objects.
#[tokio::test]
async fn a_cleanup_on_delete_reads_the_bucket_and_deletes_the_export_s_objects() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(120, Generator::Clean));
    secrets(&api);
    put_export(
        &api,
        &w,
        "mirror",
        "42",
        "removal: Remove",
        "cleanupOnDelete: true",
    );
    let client = api.client_with_rules(chart_rules_for(ChartStore::Bucket));
    let op = Operator::start_with(client, bucket_config(&s3));
    let uid = uid(&api, "mirror");
    let s = run(&api, "mirror", "r1").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    assert_eq!(segment(&w), 120);
    assert_eq!(s3.objects(), generation(&uid, 1));

    api.delete(EXPORTS, NS, "mirror");
    wait_for("the export to go", 30, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    assert_eq!(segment(&w), 0, "the flag removed from everyone");
    assert_eq!(s3.objects(), Vec::<String>::new(), "its objects deleted");
    op.stop().await;
}

/// The Secrets store's budget: an audience larger than it is not saved; the run says so and
/// where larger audiences go; the previous audience stays in force.
#[tokio::test]
async fn an_audience_over_the_secrets_budget_is_not_saved_and_the_previous_one_stays() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(100, Generator::Clean));
    secrets(&api);
    put_export(
        &api,
        &w,
        "mirror",
        "42",
        "removal: Remove\nremovalLimitPercent: 100",
        "",
    );
    let config = Config {
        audience_store: AudienceStore::Secrets { budget: 4 << 10 },
        ..config()
    };
    let op = Operator::start(&api, config);
    let s = run(&api, "mirror", "r1").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");

    w.looker
        .add_look("42", Look::users(4_000, Generator::Clean));
    let s = run(&api, "mirror", "r2").await;
    let last = &s["lastRun"];
    assert_eq!(last["outcome"], "PartiallySucceeded", "{s}");
    assert_eq!(last["sent"], 4_000, "the flags went out");
    assert_eq!(last["errors"][0]["reason"], "AudienceNotSaved", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains(
            "over the 4 KiB an export may keep in Secrets (--audience-secrets-budget-mib); the previous audience is kept"
        ),
        "{message}"
    );
    assert!(
        message.contains(
            "Keep audiences in an S3-compatible bucket instead: the operator's --audience-store s3://BUCKET/PREFIX (the chart's audienceStore.type: Bucket)"
        ),
        "{message}"
    );
    // Generation 1 is still the one in force.
    let secrets: Api<Secret> = Api::namespaced(api.client(), NS);
    let manifest = secrets.get("mirror-audience").await.unwrap();
    let body = &manifest.data.unwrap()["manifest"].0;
    let m: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(m["generation"], 1, "{m}");
    assert_eq!(m["members"], 100, "{m}");
    op.stop().await;
}

/// With `rbac.holdBrazeKeySecrets: false` the operator may only read Secrets: an export with
/// `cleanupOnDelete` warns once that its key is not held, and its deletion still cleans up
/// from the bucket and never hangs.
#[tokio::test]
async fn with_get_alone_on_secrets_a_cleanup_still_runs_and_the_key_hold_is_told_refused() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(80, Generator::Clean));
    secrets(&api);
    put_export(
        &api,
        &w,
        "mirror",
        "42",
        "removal: Remove",
        "cleanupOnDelete: true",
    );
    let client = api.client_with_rules(chart_rules_for(ChartStore::BucketWithoutKeyHold));
    let op = Operator::start_with(client, bucket_config(&s3));
    let (kind, _, note) = wait_event(&api, "mirror", "BrazeKeyNotHeld", 20).await;
    assert_eq!(kind, "Warning");
    assert!(note.contains("grant patch on Secrets"), "{note}");
    let s = run(&api, "mirror", "r1").await;
    assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    assert_eq!(segment(&w), 80);

    api.delete(EXPORTS, NS, "mirror");
    wait_for("the export to go", 30, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    assert_eq!(segment(&w), 0, "the flag removed from everyone");
    assert!(s3.objects().is_empty(), "{:?}", s3.objects());
    op.stop().await;
}

/// A discard request deletes the export's objects; that run starts a new audience.
#[tokio::test]
async fn a_discard_request_deletes_the_export_s_objects() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(100, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    let client = api.client_with_rules(chart_rules_for(ChartStore::Bucket));
    let op = Operator::start_with(client, bucket_config(&s3));
    let uid = uid(&api, "mirror");
    run(&api, "mirror", "r1").await;
    assert_eq!(s3.objects(), generation(&uid, 1));

    w.looker.add_look("42", Look::users(60, Generator::Clean));
    api.patch(
        EXPORTS,
        NS,
        "mirror",
        serde_json::json!({"metadata": {"annotations": {"looker-braze.dev/discard-audience": "r2"}}}),
    );
    let s = run(&api, "mirror", "r2").await;
    let last = &s["lastRun"];
    assert_eq!(last["outcome"], "Succeeded", "{s}");
    assert_eq!(
        (last["added"].as_u64(), last["removed"].as_u64()),
        (Some(60), Some(0)),
        "a first run: everyone new, nobody removed: {last}"
    );
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .ends_with("the stored audience was discarded on request"),
        "{last}"
    );
    // Everything went with the discard: the new audience is a generation 1 again.
    assert_eq!(s3.objects(), generation(&uid, 1));
    op.stop().await;
}

/// No garbage collector deletes objects with their export: an export keeping its audience in
/// a bucket holds the finalizer, and its deletion (without `cleanupOnDelete`) deletes its
/// objects, and only its own, then lets it go; its users keep the flag.
#[tokio::test]
async fn deleting_an_export_deletes_its_objects_even_without_a_cleanup() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(50, Generator::Clean));
    secrets(&api);
    put_export(&api, &w, "mirror", "42", "removal: Remove", "");
    put_export(&api, &w, "other", "42", "delta: true", "");
    put_export(&api, &w, "plain", "42", "", "");
    let client = api.client_with_rules(chart_rules_for(ChartStore::BucketWithoutKeyHold));
    let op = Operator::start_with(client, bucket_config(&s3));
    let (mirror, other) = (uid(&api, "mirror"), uid(&api, "other"));
    for name in ["mirror", "other"] {
        let s = run(&api, name, "r1").await;
        assert_eq!(s["lastRun"]["outcome"], "Succeeded", "{s}");
    }
    let finalizers =
        |name: &str| api.get(EXPORTS, NS, name).unwrap()["metadata"]["finalizers"].clone();
    assert_eq!(
        finalizers("mirror"),
        serde_json::json!(["looker-braze.dev/cleanup"])
    );
    assert_eq!(
        finalizers("other"),
        serde_json::json!(["looker-braze.dev/cleanup"])
    );
    assert_eq!(
        finalizers("plain"),
        serde_json::Value::Null,
        "no stored audience, no finalizer"
    );
    let mut both = generation(&mirror, 1);
    both.extend(generation(&other, 1));
    both.sort();
    assert_eq!(s3.objects(), both);

    api.delete(EXPORTS, NS, "mirror");
    wait_for("the export to go", 30, || {
        api.get(EXPORTS, NS, "mirror").is_none().then_some(())
    })
    .await;
    assert_eq!(s3.objects(), generation(&other, 1), "only its own objects");
    assert_eq!(segment(&w), 50, "no cleanup: the users keep the flag");
    op.stop().await;
}

/// `cleanupOnDelete` turned off: the Braze key is let go, while the export keeps the
/// finalizer for its objects.
#[tokio::test]
async fn turning_the_cleanup_off_lets_the_key_go_and_keeps_the_export_s_finalizer() {
    let (api, w, s3) = (
        FakeApiServer::start().await,
        World::start().await,
        S3Server::start().await,
    );
    w.looker.add_look("42", Look::users(20, Generator::Clean));
    secrets(&api);
    put_export(
        &api,
        &w,
        "mirror",
        "42",
        "removal: Remove",
        "cleanupOnDelete: true",
    );
    let client = api.client_with_rules(chart_rules_for(ChartStore::Bucket));
    let op = Operator::start_with(client, bucket_config(&s3));
    let key_held = || {
        api.get(SECRETS, NS, "braze-api").unwrap()["metadata"]["finalizers"]
            == serde_json::json!(["looker-braze.dev/cleanup"])
    };
    wait_for("the key held", 20, || key_held().then_some(())).await;
    api.patch(
        EXPORTS,
        NS,
        "mirror",
        serde_json::json!({"spec": {"cleanupOnDelete": false}}),
    );
    wait_for("the key let go", 20, || (!key_held()).then_some(())).await;
    assert_eq!(
        api.get(EXPORTS, NS, "mirror").unwrap()["metadata"]["finalizers"],
        serde_json::json!(["looker-braze.dev/cleanup"])
    );
    op.stop().await;
}
