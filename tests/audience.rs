//! Audience sync against the sandboxes over real HTTP: users who leave the Look lose the flag
//! (`removal: Remove`), within the removal limit; the stored audience between runs; delta runs
//! and full resyncs; the `run --state` file. Payloads, counts, the segment in the sandbox
//! Braze and the stored members are checked exactly.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use braze_export_operator::audience::{self, MemberState};
use braze_export_operator::export::{AudienceUpdate, Outcome, RunOptions, SyncMode, Trigger};
use serde_json::{Value, json};
use support::*;

fn add(id: &str, name: &str) -> Value {
    json!({"external_id": id, "_update_existing_only": true, "looker_export": {"add": [name]}})
}

fn remove(id: &str, name: &str) -> Value {
    json!({"external_id": id, "_update_existing_only": true, "looker_export": {"remove": [name]}})
}

const REMOVE: &str = "removal: Remove\nbatchSize: 75";

fn opts() -> RunOptions {
    RunOptions::new(Trigger::Cli)
}

/// The objects of every request Braze received since request `from`, in order.
fn objects_since(w: &World, from: usize) -> Vec<Vec<Value>> {
    w.braze.requests()[from..]
        .iter()
        .map(|r| r.body["attributes"].as_array().unwrap().clone())
        .collect()
}

fn segment(w: &World, name: &str) -> BTreeSet<String> {
    w.braze.segment("looker_export", name)
}

#[tokio::test]
async fn a_second_run_removes_users_who_left_after_its_adds() {
    let w = World::start().await;
    let yaml = w.yaml("1", REMOVE, "");
    w.looker.add_look("1", look_of(1..=10));
    let first = w.sync(&yaml, None, opts()).await;
    assert_eq!(first.report.outcome, Outcome::Succeeded);
    let c = first.report.counts;
    assert_eq!(
        (c.sent, c.added, c.removal_candidates, c.removed),
        (10, Some(10), Some(0), Some(0))
    );
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=10));
    let state = stored(&first);
    assert_eq!(state.header().members, 10);
    assert_eq!(state.header().export_name, "LOOKER_EXPORT");

    // User 10 leaves, user 11 arrives.
    w.looker.add_look("1", look_of((1..=9).chain([11])));
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(state), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    let c = r.counts;
    assert_eq!(
        (
            c.rows_read,
            c.sent,
            c.added,
            c.removal_candidates,
            c.removed
        ),
        (10, 10, Some(1), Some(1), Some(1))
    );
    assert_eq!(
        (c.removal_rejected, c.removal_failed, c.removal_withheld),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(r.message, "10 users flagged (1 new), 1 removed");
    let sent = objects_since(&w, before);
    assert_eq!(sent.len(), 2, "one request of adds, then one of removals");
    let adds: Vec<Value> = users((1..=9).chain([11]))
        .iter()
        .map(|id| add(id, "LOOKER_EXPORT"))
        .collect();
    assert_eq!(sent[0], adds);
    assert_eq!(sent[1], [remove("user-0000010", "LOOKER_EXPORT")]);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users((1..=9).chain([11])));
    let m = members(&stored(&second));
    assert_eq!(
        m.keys().cloned().collect::<BTreeSet<_>>(),
        users((1..=9).chain([11]))
    );
    assert!(m.values().all(|s| *s == MemberState::Flagged));
}

#[tokio::test]
async fn users_whose_add_failed_are_not_removed_and_stay_in_the_audience() {
    let w = World::start().await;
    let yaml = w.yaml("1", "removal: Remove\nbatchSize: 1\nconcurrency: 1", "");
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&yaml, None, opts()).await);

    // Users 3 (flagged before) and 11 (new) cannot be delivered this time.
    w.braze.set_failing_ids(&["user-0000003", "user-0000011"]);
    w.looker.add_look("1", look_of(1..=11));
    let second = w.sync(&yaml, Some(first), opts()).await;
    let c = second.report.counts;
    assert_eq!(second.report.outcome, Outcome::PartiallySucceeded);
    assert_eq!(
        (c.sent, c.failed, c.added, c.removed),
        (9, 2, Some(0), Some(0))
    );
    let m = members(&stored(&second));
    assert_eq!(m.len(), 11, "both stay in the stored audience");
    assert_eq!(m["user-0000003"], MemberState::Pending);
    assert_eq!(
        m["user-0000011"],
        MemberState::Pending,
        "its add may have gone through"
    );
    assert_eq!(m["user-0000004"], MemberState::Flagged);
    assert!(
        segment(&w, "LOOKER_EXPORT").contains("user-0000003"),
        "still flagged"
    );

    // They leave the Look: both get a removal (the pending one may hold the flag).
    w.braze.set_failing_ids(&[]);
    w.looker
        .add_look("1", look_of((1..=10).filter(|i| *i != 3)));
    let before = w.braze.requests().len();
    let third = w.sync(&yaml, Some(stored(&second)), opts()).await;
    assert_eq!(third.report.counts.removed, Some(2));
    let removals: BTreeSet<String> = objects_since(&w, before)
        .concat()
        .iter()
        .filter(|o| o["looker_export"].get("remove").is_some())
        .map(identifier)
        .collect();
    assert_eq!(removals, users([3, 11]));
    assert_eq!(
        segment(&w, "LOOKER_EXPORT"),
        users((1..=10).filter(|i| *i != 3))
    );
}

#[tokio::test]
async fn a_removal_that_fails_stays_and_is_removed_by_the_next_run() {
    let w = World::start().await;
    let yaml = w.yaml("1", REMOVE, "");
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&yaml, None, opts()).await);

    w.looker.add_look("1", look_of(1..=9));
    w.braze.set_failing_ids(&["user-0000010"]);
    let second = w.sync(&yaml, Some(first), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded);
    assert_eq!(
        (
            r.counts.removal_candidates,
            r.counts.removed,
            r.counts.removal_failed
        ),
        (Some(1), Some(0), Some(1))
    );
    assert_eq!(r.errors[0].reason, "BrazeServerError");
    assert_eq!(
        r.errors[0].message,
        "1 removal not delivered (the users stay in the stored audience, and a later run removes them): Braze answered 503 on all 6 attempts"
    );
    assert!(segment(&w, "LOOKER_EXPORT").contains("user-0000010"));
    let m = members(&stored(&second));
    assert_eq!(m.get("user-0000010"), Some(&MemberState::Pending));

    w.braze.set_failing_ids(&[]);
    let third = w.sync(&yaml, Some(stored(&second)), opts()).await;
    assert_eq!(third.report.outcome, Outcome::Succeeded);
    assert_eq!(third.report.counts.removed, Some(1));
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=9));
    assert!(!members(&stored(&third)).contains_key("user-0000010"));
}

#[tokio::test]
async fn a_look_returning_nothing_never_wipes_the_segment() {
    let w = World::start().await;
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&w.yaml("1", REMOVE, ""), None, opts()).await);
    w.looker.add_look("1", look_of([]));
    for limit in [20, 100] {
        let yaml = w.yaml("1", &format!("{REMOVE}\nremovalLimitPercent: {limit}"), "");
        let before = w.braze.requests().len();
        let r = w.sync(&yaml, Some(first.clone()), opts()).await;
        let report = &r.report;
        assert_eq!(report.outcome, Outcome::PartiallySucceeded, "limit {limit}");
        assert_eq!(
            (report.counts.removal_withheld, report.counts.removed),
            (Some(10), Some(0)),
            "limit {limit}"
        );
        assert_eq!(report.errors[0].reason, "RemovalLimitExceeded");
        assert_eq!(report.errors[0].count, 10);
        assert!(
            report.errors[0]
                .message
                .starts_with("the Look returned no users: removing all 10 users of the stored audience is refused at any removalLimitPercent"),
            "{}",
            report.errors[0].message
        );
        assert!(
            report.errors[0]
                .message
                .contains("looker-braze.dev/allow-removal")
        );
        assert_eq!(w.braze.requests().len(), before, "nothing sent");
        assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=10));
        assert_eq!(
            members(&stored(&r)),
            members(&first),
            "the stored audience is kept"
        );
    }
    // Allowed once: the segment is emptied.
    let mut allowed = opts();
    allowed.allow_removal_over_limit = true;
    let r = w.sync(&w.yaml("1", REMOVE, ""), Some(first), allowed).await;
    assert_eq!(
        (r.report.outcome, r.report.counts.removed),
        (Outcome::Succeeded, Some(10))
    );
    assert!(segment(&w, "LOOKER_EXPORT").is_empty());
    assert!(members(&stored(&r)).is_empty());
}

#[tokio::test]
async fn changing_export_name_with_remove_moves_the_flag() {
    let w = World::start().await;
    w.looker.add_look("1", look_of(1..=5));
    let first = stored(
        &w.sync(
            &w.yaml("1", "removal: Remove\nexportName: OLD", ""),
            None,
            opts(),
        )
        .await,
    );
    w.looker.add_look("1", look_of(1..=4));
    let before = w.braze.requests().len();
    let r = w
        .sync(
            &w.yaml("1", "removal: Remove\nexportName: NEW", ""),
            Some(first),
            opts(),
        )
        .await;
    let c = r.report.counts;
    assert_eq!(r.report.outcome, Outcome::Succeeded, "{:#?}", r.report);
    assert_eq!(
        (c.sent, c.added, c.removal_candidates, c.removed),
        (4, Some(4), Some(5), Some(5))
    );
    let sent = objects_since(&w, before);
    assert_eq!(
        sent[0],
        users(1..=4)
            .iter()
            .map(|u| add(u, "NEW"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        sent[1],
        users(1..=5)
            .iter()
            .map(|u| remove(u, "OLD"))
            .collect::<Vec<_>>()
    );
    assert!(segment(&w, "OLD").is_empty());
    assert_eq!(segment(&w, "NEW"), users(1..=4));
    let state = stored(&r);
    assert_eq!(state.header().export_name, "NEW");
    assert_eq!(members(&state).len(), 4);
}

#[tokio::test]
async fn changing_export_name_with_keep_leaves_the_old_value() {
    let w = World::start().await;
    w.looker.add_look("1", look_of(1..=5));
    let first = stored(
        &w.sync(&w.yaml("1", "exportName: OLD", ""), None, opts())
            .await,
    );
    w.looker.add_look("1", look_of(1..=4));
    let before = w.braze.requests().len();
    let r = w
        .sync(&w.yaml("1", "exportName: NEW", ""), Some(first), opts())
        .await;
    let c = r.report.counts;
    assert_eq!((c.sent, c.added, c.removed), (4, Some(4), None));
    let sent = objects_since(&w, before).concat();
    assert!(
        sent.iter()
            .all(|o| o["looker_export"].get("remove").is_none())
    );
    assert_eq!(
        segment(&w, "OLD"),
        users(1..=5),
        "Keep leaves the old value"
    );
    assert_eq!(segment(&w, "NEW"), users(1..=4));
    assert_eq!(stored(&r).header().export_name, "NEW");
}

#[tokio::test]
async fn keep_remembers_everyone_ever_flagged() {
    let w = World::start().await;
    let yaml = w.yaml("1", "", "");
    w.looker.add_look("1", look_of(1..=5));
    let first = stored(&w.sync(&yaml, None, opts()).await);
    w.looker.add_look("1", look_of(4..=6));
    let r = w.sync(&yaml, Some(first), opts()).await;
    assert_eq!(
        (r.report.counts.added, r.report.counts.removed),
        (Some(1), None)
    );
    assert_eq!(
        members(&stored(&r)).len(),
        6,
        "users who left keep the flag, and stay"
    );
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=6));
}

#[tokio::test]
async fn delta_sends_only_new_users_and_counts_unchanged() {
    let w = World::start().await;
    let yaml = w.yaml("1", "removal: Remove\ndelta: true", "");
    w.looker.add_look("1", look_of(1..=10));
    let first = w.sync(&yaml, None, opts()).await;
    assert_eq!(first.report.sync_mode, Some(SyncMode::Full));
    assert_eq!(
        (first.report.counts.sent, first.report.counts.unchanged),
        (10, Some(0))
    );
    assert!(
        first.report.message.starts_with("full resync: "),
        "{}",
        first.report.message
    );

    w.looker
        .add_look("1", look_of((2..=10).chain([11, 12, 11])));
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(stored(&first)), opts()).await;
    let r = &second.report;
    assert_eq!(r.sync_mode, Some(SyncMode::Delta));
    let c = r.counts;
    assert_eq!(
        (
            c.rows_read,
            c.sent,
            c.unchanged,
            c.duplicates,
            c.added,
            c.removed
        ),
        (12, 2, Some(9), 1, Some(2), Some(1))
    );
    assert_eq!(
        r.message,
        "delta run: 2 users flagged (2 new), 9 unchanged, 1 removed, 1 duplicate"
    );
    let sent = objects_since(&w, before);
    assert_eq!(
        sent[0],
        [
            add("user-0000011", "LOOKER_EXPORT"),
            add("user-0000012", "LOOKER_EXPORT")
        ]
    );
    assert_eq!(sent[1], [remove("user-0000001", "LOOKER_EXPORT")]);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(2..=12));
    assert_eq!(members(&stored(&second)).len(), 11);
}

#[tokio::test]
async fn a_full_resync_runs_after_the_interval_and_on_demand() {
    let w = World::start().await;
    let yaml = w.yaml("1", "delta: true\nfullResyncInterval: 2s", "");
    w.looker.add_look("1", look_of(1..=3));
    let first = stored(&w.sync(&yaml, None, opts()).await);
    let resynced = first.header().last_full_resync.expect("recorded");
    // Someone takes the flag off user 2 in Braze; a delta run does not see it.
    w.braze.set_array("user-0000002", "looker_export", &[]);
    let delta = w.sync(&yaml, Some(first), opts()).await;
    assert_eq!(
        (
            delta.report.sync_mode,
            delta.report.counts.sent,
            delta.report.counts.unchanged
        ),
        (Some(SyncMode::Delta), 0, Some(3))
    );
    let state = stored(&delta);
    assert_eq!(
        state.header().last_full_resync,
        Some(resynced),
        "a delta run keeps it"
    );
    assert!(!segment(&w, "LOOKER_EXPORT").contains("user-0000002"));

    // On demand.
    let mut full = opts();
    full.full_resync = true;
    let forced = w.sync(&yaml, Some(state.clone()), full).await;
    assert_eq!(
        (
            forced.report.sync_mode,
            forced.report.counts.sent,
            forced.report.counts.unchanged
        ),
        (Some(SyncMode::Full), 3, Some(0))
    );
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=3), "repaired");

    // After the interval.
    w.braze.set_array("user-0000002", "looker_export", &[]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let due = w.sync(&yaml, Some(state), opts()).await;
    assert_eq!(
        (due.report.sync_mode, due.report.counts.sent),
        (Some(SyncMode::Full), 3)
    );
    assert!(stored(&due).header().last_full_resync > Some(resynced));
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=3));
}

#[tokio::test]
async fn remove_and_delta_without_an_audience_fail_clearly() {
    let w = World::start().await;
    w.looker.add_look("1", look_of(1..=3));
    for extra in ["removal: Remove", "delta: true"] {
        let r = w.run(&w.yaml("1", extra, "")).await;
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.errors[0].reason, "AudienceRequired");
    }
    assert_eq!(w.braze.request_count(), 0);
}

#[tokio::test]
async fn the_library_refuses_an_audience_of_another_export() {
    let w = World::start().await;
    w.looker.add_look("1", look_of(1..=3));
    let first = stored(&w.sync(&w.yaml("1", REMOVE, ""), None, opts()).await);
    let other = w
        .yaml("1", REMOVE, "")
        .replace("name: test-export", "name: other");
    let doc = braze_export_operator::commands::load::load_export(&other).unwrap();
    let plan = braze_export_operator::export::ExportPlan::new("other", &doc.spec).unwrap();
    let input = braze_export_operator::export::AudienceInput {
        owner: audience::Owner {
            namespace: Some("marketing".into()),
            name: "other".into(),
        },
        previous: Some(first),
        pending_log: None,
    };
    let r = braze_export_operator::export::run_export_synced(
        &fast_services(),
        &plan,
        &creds(),
        opts(),
        Some(input),
    )
    .await;
    assert_eq!(r.report.errors[0].reason, "AudienceMismatch");
    assert_eq!(r.audience, AudienceUpdate::Keep);
}

// ---- the `run` command with --state ----

fn state_path(dir: &tempfile::TempDir) -> String {
    dir.path().join("churn.state").to_str().unwrap().to_owned()
}

#[tokio::test]
async fn run_without_state_refuses_remove_and_delta() {
    let w = World::start().await;
    w.looker.add_look("1", look_of(1..=3));
    for extra in ["removal: Remove", "delta: true"] {
        let (out, _spec) = cli_run(&w.yaml("1", extra, ""), &[]).await;
        assert_eq!(out.code, 2, "{}", out.stderr);
        assert!(
            out.stderr
                .contains("need --state FILE: the file keeps the export's audience"),
            "{}",
            out.stderr
        );
    }
    assert_eq!(w.braze.request_count(), 0);
    assert!(w.looker.requests().is_empty());
}

#[tokio::test]
async fn run_with_state_creates_it_and_refuses_one_of_another_export_or_identifier() {
    let w = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_path(&dir);
    w.looker.add_look("1", look_of(1..=3));
    let (out, _s) = cli_run(&w.yaml("1", REMOVE, ""), &["--state", &state]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.report()["added"], 3);
    let saved = std::fs::read(&state).unwrap();
    let header = audience::Encoded::from_bytes(saved.clone())
        .unwrap()
        .header()
        .clone();
    assert_eq!(header.export.to_string(), "marketing/test-export");

    let requests = w.braze.request_count();
    let cases = [
        (
            w.yaml("1", REMOVE, "")
                .replace("name: test-export", "name: vip"),
            "it belongs to the export marketing/test-export, not marketing/vip",
        ),
        (
            w.yaml("1", &format!("{REMOVE}\nidentifier: braze_id"), ""),
            "it holds external_id identifiers, and this export uses braze_id",
        ),
    ];
    for (yaml, why) in cases {
        let (out, _s) = cli_run(&yaml, &["--state", &state]).await;
        assert_eq!(out.code, 2, "{}", out.stderr);
        assert_eq!(
            out.stderr.trim(),
            format!("error: the state file {state} cannot be used: {why}")
        );
    }
    // Damaged: refused, never overwritten.
    let mut damaged = saved.clone();
    let last = damaged.len() - 3;
    damaged[last] ^= 0x55;
    std::fs::write(&state, &damaged).unwrap();
    let (out, _s) = cli_run(&w.yaml("1", REMOVE, ""), &["--state", &state]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.starts_with(&format!(
            "error: the state file {state} cannot be used: it is damaged"
        )),
        "{}",
        out.stderr
    );
    std::fs::write(&state, b"not a state").unwrap();
    let (out, _s) = cli_run(&w.yaml("1", REMOVE, ""), &["--state", &state]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("it is not a stored audience"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(&state).unwrap(), b"not a state");
    assert_eq!(w.braze.request_count(), requests, "nothing was sent");
}

#[tokio::test]
async fn run_over_the_limit_removes_nobody_and_keeps_the_state() {
    let w = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_path(&dir);
    let yaml = w.yaml("1", REMOVE, "");
    w.looker.add_look("1", look_of(1..=10));
    let (out, _s) = cli_run(&yaml, &["--state", &state]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let saved = audience::read_file(std::path::Path::new(&state))
        .unwrap()
        .unwrap();

    w.looker.add_look("1", look_of(1..=7));
    let before = w.braze.requests().len();
    let (out, _s) = cli_run(&yaml, &["--state", &state]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    let report = out.report();
    assert_eq!(report["outcome"], "PartiallySucceeded");
    assert_eq!(
        (
            &report["removalCandidates"],
            &report["removalWithheld"],
            &report["removed"]
        ),
        (&json!(3), &json!(3), &json!(0))
    );
    assert_eq!(report["errors"][0]["reason"], "RemovalLimitExceeded");
    assert_eq!(report["errors"][0]["count"], 3);
    let message = report["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("this run would remove 3 of the 10 users of the stored audience (30.0%), more than removalLimitPercent 20%: nobody was removed"),
        "{message}"
    );
    assert!(
        message.contains("raise spec.braze.removalLimitPercent for one run"),
        "{message}"
    );
    let removals = objects_since(&w, before)
        .concat()
        .iter()
        .filter(|o| o["looker_export"].get("remove").is_some())
        .count();
    assert_eq!(removals, 0);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=10));
    let kept = audience::read_file(std::path::Path::new(&state))
        .unwrap()
        .unwrap();
    assert_eq!(
        members(&kept),
        members(&saved),
        "the stored audience is as it was"
    );

    // Once allowed: removed.
    let (out, _s) = cli_run(&yaml, &["--state", &state, "--allow-removal"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.report()["removed"], 3);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=7));
}

#[tokio::test]
async fn dry_run_and_dump_show_the_removals_and_keep_the_state() {
    let w = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_path(&dir);
    let yaml = w.yaml("1", REMOVE, "");
    w.looker.add_look("1", look_of(1..=10));
    let (out, _s) = cli_run(&yaml, &["--state", &state]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let saved = std::fs::read(&state).unwrap();

    w.looker.add_look("1", look_of(1..=9));
    let dump = dir.path().join("dump.jsonl");
    let requests = w.braze.request_count();
    let (out, _s) = cli_run(
        &yaml,
        &[
            "--state",
            &state,
            "--dry-run",
            "--dump-payloads",
            dump.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let report = out.report();
    assert_eq!(report["dryRun"], true);
    assert_eq!(
        (&report["sent"], &report["removed"]),
        (&json!(9), &json!(1))
    );
    assert_eq!(
        report["message"],
        "9 users would be flagged (0 new, dry run), 1 would be removed"
    );
    let lines: Vec<Value> = std::fs::read_to_string(&dump)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[1],
        json!({"attributes": [remove("user-0000010", "LOOKER_EXPORT")]})
    );
    assert_eq!(w.braze.request_count(), requests, "nothing reaches Braze");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        saved,
        "a dry run never writes the state"
    );
}

#[tokio::test]
async fn no_identifier_in_any_message_or_log() {
    let w = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_path(&dir);
    let yaml = w.yaml(
        "1",
        "removal: Remove\ndelta: true\nbatchSize: 1\nconcurrency: 1",
        "",
    );
    w.looker.add_look("1", look_of(1..=10));
    let env = [("RUST_LOG", "debug")];
    let spec = write_spec(&yaml);
    let mut outputs = Vec::new();
    let run = |extra: &'static [&'static str]| {
        let mut args = vec!["--output", "json", "--state", state.as_str()];
        args.extend_from_slice(extra);
        args
    };
    outputs.push(cli_spec(&spec, &run(&[]), &[], &env).await);
    // A failing add, a failing removal, and a run over the limit.
    w.braze.set_failing_ids(&["user-0000002", "user-0000011"]);
    w.looker.add_look("1", look_of((3..=11).chain([2])));
    outputs.push(cli_spec(&spec, &run(&[]), &[], &env).await);
    w.looker.add_look("1", look_of([]));
    outputs.push(cli_spec(&spec, &run(&[]), &[], &env).await);
    outputs.push(cli_spec(&spec, &run(&["--dry-run"]), &["BRAZE_API_KEY"], &env).await);
    let other = write_spec(&yaml.replace("name: test-export", "name: x"));
    outputs.push(cli_spec(&other, &run(&[]), &[], &env).await);
    let codes: Vec<i32> = outputs.iter().map(|o| o.code).collect();
    assert_eq!(codes, [0, 3, 3, 3, 2]);
    for out in &outputs {
        for text in [&out.stdout, &out.stderr] {
            assert!(!text.contains("user-00"), "an identifier leaked:\n{text}");
        }
    }
}

/// The "recent signups" Look of issue 17 as it stood last run: the 4,800 users 801 to 5,600
/// flagged (read whole: its row limit was higher then). Returns the stored audience.
async fn recent_signups_last_run(w: &World, yaml: &str) -> audience::Encoded {
    let mut last = look_of(801..=5600);
    last.table_limit = 10_000;
    w.looker.add_look("1", last);
    let first = w.sync(yaml, None, opts()).await;
    assert_eq!(
        first.report.outcome,
        Outcome::Succeeded,
        "{:#?}",
        first.report
    );
    assert_eq!(first.report.counts.sent, 4800);
    stored(&first)
}

/// Today the Look has the 5,400 users 1 to 5,400 (800 new, 200 gone), under a row limit of
/// `table_limit`.
fn recent_signups_today(w: &World, table_limit: u64) {
    let mut today = look_of(1..=5400);
    today.table_limit = table_limit;
    w.looker.add_look("1", today);
}

/// The removal objects Braze received since request `from`, by identifier (requests in
/// flight at once land in any order).
fn removals_since(w: &World, from: usize) -> Vec<Value> {
    let mut removals: Vec<Value> = objects_since(w, from)
        .concat()
        .into_iter()
        .filter(|o| o["looker_export"].get("remove").is_some())
        .collect();
    removals.sort_by(|a, b| a["external_id"].as_str().cmp(&b["external_id"].as_str()));
    removals
}

#[tokio::test]
async fn a_look_that_returned_its_row_limit_removes_nobody() {
    let w = World::start().await;
    let yaml = w.yaml("1", REMOVE, "");
    let state = recent_signups_last_run(&w, &yaml).await;
    // Saved limit 5,000: Looker returns users 1 to 5,000. Users 5,001 to 5,400 are still in
    // the Look, beyond the cut; only 5,401 to 5,600 really left.
    recent_signups_today(&w, 5000);
    let looks_before = w.looker.requests_to("/looks/1").len();
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(state), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded, "{r:#?}");
    let c = r.counts;
    assert_eq!(
        (c.rows_read, c.sent, c.added, c.unchanged),
        (5000, 5000, Some(800), None)
    );
    assert_eq!(
        (
            c.removal_candidates,
            c.removed,
            c.removal_withheld,
            c.removal_rejected,
            c.removal_failed
        ),
        (Some(600), Some(0), Some(600), Some(0), Some(0))
    );
    let why = "Look 1 returned its row limit (5000 rows): it may be cut, so nobody was removed; set spec.looker.results: All, or raise the Look's row limit in Looker";
    assert_eq!(
        r.message,
        format!(
            "5000 users flagged (800 new), 600 removals withheld at the Look's row limit; {why}"
        )
    );
    assert_eq!(r.errors.len(), 1, "{:#?}", r.errors);
    assert_eq!(
        (
            r.errors[0].reason.as_str(),
            r.errors[0].message.as_str(),
            r.errors[0].count
        ),
        ("LookLimitReached", why, 600)
    );
    assert!(removals_since(&w, before).is_empty(), "Braze got a removal");
    assert_eq!(
        objects_since(&w, before).concat().len(),
        5000,
        "the adds still went out"
    );
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=5600));
    // Everyone stays in the stored audience: this run's 5,000 and the 600 not removed.
    let m = members(&stored(&second));
    assert_eq!(m.keys().cloned().collect::<BTreeSet<_>>(), users(1..=5600));
    assert!(m.values().all(|s| *s == MemberState::Flagged));
    // The limit was read before the run, with only the query's limit asked for.
    let looks = w.looker.requests_to("/looks/1");
    assert_eq!(looks.len(), looks_before + 1);
    let look = looks.last().unwrap();
    assert_eq!(look.method, "GET");
    assert_eq!(look.query, [("fields".into(), "query(limit)".into())]);
    assert!(look.authorization.as_deref().unwrap().starts_with("token "));

    // Even --allow-removal does not remove from a Look that may be cut.
    let allowed = RunOptions {
        allow_removal_over_limit: true,
        ..opts()
    };
    let before = w.braze.requests().len();
    let third = w.sync(&yaml, Some(stored(&second)), allowed).await;
    assert_eq!(third.report.outcome, Outcome::PartiallySucceeded);
    assert_eq!(third.report.counts.removal_withheld, Some(600));
    assert!(removals_since(&w, before).is_empty());
}

#[tokio::test]
async fn a_look_without_a_saved_limit_is_held_to_looker_s_default() {
    let w = World::start().await;
    let yaml = w.yaml("1", REMOVE, "");
    let state = recent_signups_last_run(&w, &yaml).await;
    let mut today = look_of(1..=5400);
    today.query_limit = Some(Value::Null);
    w.looker.add_look("1", today);
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(state), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded, "{r:#?}");
    assert_eq!(
        (r.counts.sent, r.counts.removed, r.counts.removal_withheld),
        (5000, Some(0), Some(600))
    );
    assert_eq!(
        r.errors[0].message,
        "Look 1 returned its row limit (5000 rows, Looker's default: the Look saves none): it may be cut, so nobody was removed; set spec.looker.results: All, or raise the Look's row limit in Looker"
    );
    assert!(removals_since(&w, before).is_empty());
}

#[tokio::test]
async fn the_same_look_with_results_all_removes_who_left() {
    let w = World::start().await;
    let yaml = w.yaml_looker("1", "results: All", REMOVE, "");
    let state = recent_signups_last_run(&w, &yaml).await;
    recent_signups_today(&w, 5000);
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(state), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    let c = r.counts;
    assert_eq!(
        (c.rows_read, c.sent, c.added, c.removed, c.removal_withheld),
        (5400, 5400, Some(800), Some(200), Some(0))
    );
    assert_eq!(r.message, "5400 users flagged (800 new), 200 removed");
    let removed: Vec<Value> = (5401..=5600)
        .map(|i| remove(&format!("user-{i:07}"), "LOOKER_EXPORT"))
        .collect();
    assert_eq!(removals_since(&w, before), removed);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=5400));
    assert!(
        w.looker.requests_to("/looks/1").is_empty(),
        "results: All has no limit to read"
    );
}

#[tokio::test]
async fn a_look_under_its_row_limit_removes_who_left() {
    let w = World::start().await;
    let yaml = w.yaml("1", REMOVE, "");
    let state = recent_signups_last_run(&w, &yaml).await;
    recent_signups_today(&w, 5401);
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(state), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    let c = r.counts;
    assert_eq!(
        (c.rows_read, c.sent, c.added, c.removed, c.removal_withheld),
        (5400, 5400, Some(800), Some(200), Some(0))
    );
    assert_eq!(r.message, "5400 users flagged (800 new), 200 removed");
    assert_eq!(removals_since(&w, before).len(), 200);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=5400));
    let m = members(&stored(&second));
    assert_eq!(m.keys().cloned().collect::<BTreeSet<_>>(), users(1..=5400));
}

/// A Look at its row limit is never `Succeeded` with `removal: Remove`, even when nobody is
/// to be removed: on a first run, and on a run nobody left, users past the cut were never
/// read, so never flagged.
#[tokio::test]
async fn a_look_at_its_row_limit_is_partially_succeeded_even_when_nobody_left() {
    let w = World::start().await;
    let yaml = w.yaml("1", REMOVE, "");
    let cut = "Look 1 returned its row limit (5000 rows): it may be cut, so nobody was removed; set spec.looker.results: All, or raise the Look's row limit in Looker";
    let mut first = look_of(1..=5400);
    first.table_limit = 5000;
    w.looker.add_look("1", first);
    let r1 = w.sync(&yaml, None, opts()).await;
    let r = &r1.report;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded, "{r:#?}");
    assert_eq!((r.counts.sent, r.counts.removed), (5000, Some(0)));
    assert_eq!(r.errors[0].reason, "LookLimitReached");
    assert_eq!((r.errors[0].message.as_str(), r.errors[0].count), (cut, 1));
    assert!(r.message.ends_with(cut), "{}", r.message);

    // The same 5,000 again: nobody left, and the result may still be cut.
    let state = match r1.audience {
        braze_export_operator::export::AudienceUpdate::Replace(a) => a,
        other => panic!("an audience to keep: {other:?}"),
    };
    let r2 = w.sync(&yaml, Some(state), opts()).await;
    let r = &r2.report;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded, "{r:#?}");
    assert_eq!(r.counts.removal_withheld.unwrap_or(0), 0);
    assert_eq!(r.errors[0].reason, "LookLimitReached");
}
