//! `run --state s3://BUCKET/KEY`: the audience kept in an S3-compatible bucket between runs
//! of the binary (a real S3 server on loopback, s3s-fs; endpoint and keys from the AWS_*
//! environment), and a bucket that cannot be read refused with a message naming the object.

#[path = "support/bucket.rs"]
mod bucket;
mod support;

use braze_export_operator::sandbox::{Generator, Look};
use bucket::*;
use support::*;

/// `run --state STATE` with the bucket's environment, logging at debug.
async fn run_with_state(w: &World, s3: &S3Server, state: &str) -> Cli {
    let yaml = w.yaml("42", "removal: Remove", "");
    let spec = write_spec(&yaml);
    let mut env = s3.env();
    env.push(("RUST_LOG", "debug".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cli_spec(&spec, &["--output", "json", "--state", state], &[], &env).await
}

#[tokio::test]
async fn run_state_in_a_bucket_round_trips_and_removes_who_left() {
    let (w, s3) = (World::start().await, S3Server::start().await);
    w.looker.add_look("42", Look::users(200, Generator::Clean));
    let first = run_with_state(&w, &s3, "s3://audiences/cli/churn").await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(
        s3.objects(),
        [
            "cli/churn/audience-00000000000000000001",
            "cli/churn/manifest.json"
        ]
    );

    w.looker.add_look("42", Look::users(180, Generator::Clean));
    let second = run_with_state(&w, &s3, "s3://audiences/cli/churn").await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.report()["removed"], 20, "{}", second.stdout);
    assert_eq!(
        s3.objects(),
        [
            "cli/churn/audience-00000000000000000002",
            "cli/churn/manifest.json"
        ]
    );
    for out in [&first.stderr, &second.stderr, &second.stdout] {
        assert!(
            !out.contains(SECRET_KEY) && !out.contains(ACCESS_KEY),
            "{out}"
        );
    }
}

#[tokio::test]
async fn a_bucket_that_cannot_be_read_is_refused_naming_the_object() {
    let (w, s3) = (World::start().await, S3Server::start().await);
    w.looker.add_look("42", Look::users(10, Generator::Clean));
    s3.set_fault(Some(Fault::Unavailable));
    let out = run_with_state(&w, &s3, "s3://audiences/cli/churn").await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "error: the stored audience s3://audiences/cli/churn cannot be used: cannot read s3://audiences/cli/churn/manifest.json: the server answered 503"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(w.braze.accepted_count(), 0, "nothing sent");
    assert!(!out.stderr.contains(ACCESS_KEY), "{}", out.stderr);

    // Writes refused: the new users cannot be recorded as pending first, so none is sent
    // (Failed), and the state is not saved either (exit 1).
    s3.set_fault(Some(Fault::RefuseWrites));
    let out = run_with_state(&w, &s3, "s3://audiences/cli/churn").await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    let report = out.report();
    assert_eq!(
        (report["outcome"].as_str(), report["sent"].as_u64()),
        (Some("Failed"), Some(0))
    );
    assert!(
        report["message"].as_str().unwrap().contains(
            "could not be recorded in the stored audience first (cannot write s3://audiences/cli/churn/pending-"
        ),
        "{report}"
    );
    assert!(
        out.stderr.contains(
            "error: cannot save the audience to s3://audiences/cli/churn: cannot write s3://audiences/cli/churn/audience-00000000000000000001: access denied (403)"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(w.braze.accepted_count(), 0, "nothing sent");
    assert!(s3.objects().is_empty(), "{:?}", s3.objects());

    let out = run_with_state(&w, &s3, "s3://audiences").await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("--state s3://audiences: name a key in the bucket"),
        "{}",
        out.stderr
    );
}
