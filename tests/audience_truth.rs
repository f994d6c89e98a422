//! The stored audience tells the truth, over real HTTP against the sandboxes: delta by
//! content (a user whose attributes changed is sent), the workspace it was written to, and
//! the pending records that keep a stopped run's users (a lost save, a refused record, a
//! changed flag, and `run --state` killed with SIGKILL at several points).

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braze_export_operator::audience::{self, Encoded};
use braze_export_operator::export::{
    AudienceUpdate, Credentials, Outcome, PendingLog, RunOptions, Trigger,
};
use braze_export_operator::redacted::Redacted;
use braze_export_operator::sandbox::{Look, Rows};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use support::*;

fn opts() -> RunOptions {
    RunOptions::new(Trigger::Cli)
}

/// A Look of the users `user-<i>`, each with `plan` as `plan_of(i)` says.
fn look_with_plan(
    ids: impl IntoIterator<Item = u64>,
    plan_of: impl Fn(u64) -> &'static str,
) -> Look {
    let fields = json!({"dimensions": [
        field("users.external_id", &["braze_id"]),
        field("users.plan", &["braze[plan]"]),
    ]});
    let rows = ids
        .into_iter()
        .map(|i| {
            row(&[
                ("users.external_id", json!(format!("user-{i:07}"))),
                ("users.plan", json!(plan_of(i))),
            ])
        })
        .collect();
    Look::new(fields, Rows::Fixed(rows))
}

fn segment(w: &World, name: &str) -> BTreeSet<String> {
    w.braze.segment("looker_export", name)
}

/// Pending records kept in memory; refuses every record when `refuse` is set.
#[derive(Debug, Default)]
struct MemoryLog {
    records: Mutex<Vec<Encoded>>,
    refuse: bool,
}

impl PendingLog for MemoryLog {
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.refuse {
                return Err("the store refused the record (test)".into());
            }
            self.records.lock().unwrap().push(record);
            Ok(())
        })
    }
}

impl MemoryLog {
    fn taken(&self) -> Vec<Encoded> {
        self.records.lock().unwrap().clone()
    }
}

fn logged(log: &Arc<MemoryLog>) -> Option<Arc<dyn PendingLog>> {
    Some(Arc::clone(log) as Arc<dyn PendingLog>)
}

/// The users of pending records.
fn recorded(records: &[Encoded]) -> BTreeSet<String> {
    records
        .iter()
        .flat_map(|r| audience::decode(r.parts().to_vec()).unwrap().members)
        .map(|m| m.id)
        .collect()
}

#[tokio::test]
async fn delta_sends_users_whose_attributes_changed_and_only_them() {
    let w = World::start().await;
    let yaml = w.yaml("1", "delta: true\nbatchSize: 75", "");
    w.looker.add_look("1", look_with_plan(1..=100, |_| "free"));
    let first = w.sync(&yaml, None, opts()).await;
    assert_eq!(first.report.counts.sent, 100);
    assert_eq!(
        w.braze.attribute("user-0000003", "plan"),
        Some(json!("free"))
    );

    // Ten users move to `pro` in Looker.
    w.looker.add_look(
        "1",
        look_with_plan(1..=100, |i| if i <= 10 { "pro" } else { "free" }),
    );
    let before = w.braze.requests().len();
    let second = w.sync(&yaml, Some(stored(&first)), opts()).await;
    let r = &second.report;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!(
        (r.counts.sent, r.counts.unchanged),
        (10, Some(90)),
        "{r:#?}"
    );
    assert_eq!(
        r.message,
        "delta run: 10 users flagged (0 new), 90 unchanged"
    );
    let sent: BTreeSet<String> = w.braze.requests()[before..]
        .iter()
        .flat_map(|q| q.body["attributes"].as_array().unwrap().clone())
        .map(|o| o["external_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, users(1..=10));
    assert_eq!(
        w.braze.attribute("user-0000003", "plan"),
        Some(json!("pro"))
    );
    assert_eq!(
        w.braze.attribute("user-0000030", "plan"),
        Some(json!("free"))
    );

    // Nothing changed since: nothing is sent.
    let third = w.sync(&yaml, Some(stored(&second)), opts()).await;
    assert_eq!(
        (third.report.counts.sent, third.report.counts.unchanged),
        (0, Some(100)),
        "{:#?}",
        third.report
    );
}

#[tokio::test]
async fn another_workspace_or_key_is_a_full_run_that_forgets_nobody() {
    let w = World::start().await;
    let yaml = w.yaml(
        "1",
        "removal: Remove\ndelta: true\nremovalLimitPercent: 100",
        "",
    );
    w.looker.add_look("1", look_of(1..=20));
    let first = w.sync(&yaml, None, opts()).await;
    let state = stored(&first);
    let was = state
        .header()
        .workspace
        .clone()
        .expect("workspace recorded");
    assert_eq!(was.len(), 16);
    assert!(!format!("{:?}", state.header()).contains(API_KEY));

    // A new key (rotated, or another workspace: nothing tells them apart); five users left.
    w.braze.add_key("rotated-key");
    let rotated = Credentials {
        braze_api_key: Some(Redacted::new("rotated-key")),
        ..creds()
    };
    w.looker.add_look("1", look_of(1..=15));
    let before = w.braze.requests().len();
    let moved = w
        .sync_with(&yaml, Some(state), opts(), None, &rotated)
        .await;
    let r = &moved.report;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!(
        (r.counts.sent, r.counts.unchanged, r.counts.removed),
        (15, Some(0), Some(0)),
        "everyone is sent, nobody removed: {r:#?}"
    );
    let note = r
        .errors
        .iter()
        .find(|e| e.reason == "WorkspaceChanged")
        .unwrap_or_else(|| panic!("{r:#?}"));
    assert_eq!(note.count, 20);
    assert!(
        note.message.starts_with(&format!(
            "the stored audience was written to another Braze workspace, or with another API key (fingerprint {was}; this run's is "
        )) && note.message.contains(
            "its 20 users stay in the audience as pending, so later runs take the flag off those who leave"
        ),
        "{}",
        note.message
    );
    assert!(!note.message.contains("rotated-key"));
    let removals = w.braze.requests()[before..]
        .iter()
        .filter(|q| q.body.to_string().contains("\"remove\""))
        .count();
    assert_eq!(removals, 0);
    let now = stored(&moved);
    assert_ne!(now.header().workspace.as_deref(), Some(was.as_str()));
    assert_eq!(
        now.header().members,
        20,
        "the five who left are kept, pending"
    );

    // The next run (same key) removes the five: a rotated key forgets nobody.
    let next = w.sync_with(&yaml, Some(now), opts(), None, &rotated).await;
    assert_eq!(next.report.counts.removed, Some(5), "{:#?}", next.report);
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=15));
}

#[tokio::test]
async fn a_change_of_flag_held_back_by_the_limit_records_it_once() {
    let w = World::start().await;
    let yaml_a = w.yaml("1", "removal: Remove\nexportName: CHURN_A", "");
    let yaml_b = w.yaml("1", "removal: Remove\nexportName: CHURN_B", "");
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&yaml_a, None, opts()).await);
    // Renamed while half the audience left: the removals are withheld, the audience kept.
    w.looker.add_look("1", look_of(1..=5));
    let log = Arc::new(MemoryLog::default());
    let held = w
        .sync_with(&yaml_b, Some(first.clone()), opts(), logged(&log), &creds())
        .await;
    assert_eq!(held.audience, AudienceUpdate::Keep, "{:#?}", held.report);
    let records = log.taken();
    assert_eq!(records.len(), 1, "one record naming the new value");
    assert_eq!(records[0].header().members, 0, "nobody new to the audience");
    assert_eq!(records[0].header().export_name, "CHURN_B");
    // Again: the value is known as stray already, so nothing more is recorded.
    let previous = Encoded::with_pending(Some(first), records).unwrap();
    let again = Arc::new(MemoryLog::default());
    w.sync_with(&yaml_b, previous, opts(), logged(&again), &creds())
        .await;
    assert!(again.taken().is_empty());
}

#[tokio::test]
async fn users_recorded_before_they_were_flagged_are_removed_after_a_lost_save() {
    let w = World::start().await;
    let yaml = w.yaml("1", "removal: Remove\nremovalLimitPercent: 100", "");
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&yaml, None, opts()).await);

    // Five users join; the run flags them, and its save is lost (a crash, a lost Lease).
    w.looker.add_look("1", look_of(1..=15));
    let log = Arc::new(MemoryLog::default());
    let second = w
        .sync_with(&yaml, Some(first.clone()), opts(), logged(&log), &creds())
        .await;
    assert_eq!(second.report.counts.added, Some(5));
    let records = log.taken();
    assert_eq!(recorded(&records), users(11..=15), "only the new users");
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=15));

    // Seven leave, among them three the lost run flagged: all seven lose the flag.
    w.looker.add_look("1", look_of((1..=8).chain([12, 14])));
    let previous = Encoded::with_pending(Some(first), records).unwrap();
    let third = w.sync(&yaml, previous, opts()).await;
    let r = &third.report;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!(
        (r.counts.removal_candidates, r.counts.removed),
        (Some(5), Some(5)),
        "{r:#?}"
    );
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users((1..=8).chain([12, 14])));
    let saved = stored(&third);
    assert_eq!(saved.header().members, 10);
    assert_eq!(saved.pending_len(), 0, "a saved audience holds no record");
}

#[tokio::test]
async fn a_record_that_cannot_be_written_stops_the_run_before_a_new_user_is_sent() {
    let w = World::start().await;
    let yaml = w.yaml("1", "removal: Remove\nbatchSize: 75", "");
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&yaml, None, opts()).await);
    let requests = w.braze.request_count();

    w.looker.add_look("1", look_of(1..=200));
    let refusing = Arc::new(MemoryLog {
        refuse: true,
        ..MemoryLog::default()
    });
    let r = w
        .sync_with(
            &yaml,
            Some(first.clone()),
            opts(),
            logged(&refusing),
            &creds(),
        )
        .await
        .report;
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!(r.errors[0].reason, "PendingNotRecorded");
    assert!(
        r.message.starts_with(
            "the users this run was about to flag could not be recorded in the stored audience first (the store refused the record (test)), so nothing more was sent"
        ),
        "{}",
        r.message
    );
    assert_eq!(r.counts.sent, 0);
    // The read stops with the refused record: every row read is accounted for, as failed.
    assert!(
        r.counts.rows_read > 0 && r.counts.rows_read <= 200,
        "{r:#?}"
    );
    assert_eq!(r.counts.failed, r.counts.rows_read, "{r:#?}");
    assert_eq!(w.braze.request_count(), requests, "nothing was sent");
    assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=10));

    // Without new users nothing needs recording: returning users still go.
    w.looker.add_look("1", look_of(1..=10));
    let r = w
        .sync_with(&yaml, Some(first), opts(), logged(&refusing), &creds())
        .await
        .report;
    assert_eq!(
        (r.outcome, r.counts.sent),
        (Outcome::Succeeded, 10),
        "{r:#?}"
    );
}

#[tokio::test]
async fn a_stopped_change_of_flag_leaves_no_stray_flag() {
    let w = World::start().await;
    let yaml_a = w.yaml(
        "1",
        "removal: Remove\nremovalLimitPercent: 100\nexportName: CHURN_A",
        "",
    );
    let yaml_b = w.yaml(
        "1",
        "removal: Remove\nremovalLimitPercent: 100\nexportName: CHURN_B",
        "",
    );
    w.looker.add_look("1", look_of(1..=10));
    let first = stored(&w.sync(&yaml_a, None, opts()).await);

    // The flag is renamed; the run gives CHURN_B to everyone, then its save is lost.
    let log = Arc::new(MemoryLog::default());
    let renamed = w
        .sync_with(&yaml_b, Some(first.clone()), opts(), logged(&log), &creds())
        .await;
    assert_eq!(segment(&w, "CHURN_B"), users(1..=10));
    // They were in the audience already: the record names the new value, and nobody.
    assert_eq!(log.taken().len(), 1);
    assert_eq!(recorded(&log.taken()), BTreeSet::new());

    // Three users leave: they lose both values; those who stay keep CHURN_B alone.
    w.looker.add_look("1", look_of(1..=7));
    let previous = Encoded::with_pending(Some(first), log.taken())
        .unwrap()
        .unwrap();
    assert_eq!(previous.header().stray_flags.len(), 1);
    let r = w.sync(&yaml_b, Some(previous), opts()).await;
    assert_eq!(r.report.outcome, Outcome::Succeeded, "{:#?}", r.report);
    assert_eq!(segment(&w, "CHURN_A"), BTreeSet::new());
    assert_eq!(segment(&w, "CHURN_B"), users(1..=7));
    let saved = stored(&r);
    assert!(saved.header().stray_flags.is_empty());
    assert_eq!(saved.header().export_name, "CHURN_B");
    drop(renamed);
}

/// `run --state`, killed with SIGKILL after Braze received `k` requests of a first run of
/// 200 users (one request in flight at a time): whatever it managed, the next run removes
/// every user who left.
#[tokio::test]
async fn run_killed_mid_run_forgets_nobody_it_flagged() {
    for k in [1u64, 8, 19] {
        let w = World::start().await;
        w.braze
            .set_latency(Duration::from_millis(150), Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("churn.state");
        let state_arg = state.to_str().unwrap().to_owned();
        let yaml = w.yaml(
            "1",
            "removal: Remove\nremovalLimitPercent: 100\nbatchSize: 10\nconcurrency: 1",
            "",
        );
        w.looker.add_look("1", look_of(1..=200));
        let spec = write_spec(&yaml);
        let mut child = tokio::process::Command::new(binary())
            .args(["run", "--file", spec.path().to_str().unwrap()])
            .args(["--output", "json", "--state", &state_arg])
            .env("LOOKERSDK_CLIENT_ID", CLIENT_ID)
            .env("LOOKERSDK_CLIENT_SECRET", CLIENT_SECRET)
            .env("BRAZE_API_KEY", API_KEY)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while w.braze.request_count() < k {
            assert!(tokio::time::Instant::now() < deadline, "k={k}: no requests");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let flagged = segment(&w, "LOOKER_EXPORT");
        assert!(!flagged.is_empty() || k == 1, "k={k}");
        assert!(!state.exists(), "k={k}: killed before it saved");
        assert!(
            !audience::read_pending(&state).unwrap().is_empty(),
            "k={k}: the users were recorded before they were sent"
        );

        // The Look shrinks to its first 50 users: everyone else loses the flag, including
        // those the killed run flagged.
        w.braze.set_latency(Duration::ZERO, Duration::ZERO);
        w.looker.add_look("1", look_of(1..=50));
        let (out, _spec) = cli_run(&yaml, &["--state", &state_arg]).await;
        assert_eq!(out.code, 0, "k={k}: {}", out.stderr);
        let report: Value = out.report();
        assert_eq!(report["outcome"], "Succeeded", "k={k}: {report}");
        assert_eq!(segment(&w, "LOOKER_EXPORT"), users(1..=50), "k={k}");
        assert!(
            audience::read_pending(&state).unwrap().is_empty(),
            "k={k}: the records are gone once the state is saved"
        );
    }
}
