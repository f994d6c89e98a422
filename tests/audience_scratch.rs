//! The new stored audience goes through the scratch directory (its users come in the Look's
//! order and are stored sorted): over real HTTP against the sandboxes, an audience sorted
//! through a few hundred bytes of memory is the one sorted in memory, one built beside its
//! state file is that file once saved, and a scratch directory that fails fails the run
//! with its reason, every row counted and the stored audience kept.

mod support;

use braze_export_operator::audience::{self, Output};
use braze_export_operator::export::options::SpillOptions;
use braze_export_operator::export::{AudienceUpdate, Outcome, RunOptions, Trigger};
use braze_export_operator::sandbox::{Look, Rows};
use braze_export_operator::spill::Scratch;
use serde_json::json;
use support::*;

/// Users `ids` in this order, one row each.
fn look(ids: &[u64]) -> Look {
    let fields = json!({"dimensions": [
        field("users.external_id", &["braze_id"]),
        field("users.plan", &["braze[plan]"]),
    ]});
    let rows = ids
        .iter()
        .map(|i| {
            row(&[
                ("users.external_id", json!(format!("user-{i:07}"))),
                ("users.plan", json!("free")),
            ])
        })
        .collect();
    Look::new(fields, Rows::Fixed(rows))
}

fn shuffled(n: u64) -> Vec<u64> {
    let mut ids: Vec<u64> = (1..=n).collect();
    fastrand::Rng::with_seed(4).shuffle(&mut ids);
    ids
}

/// Options that write a sorted run of the audience's users every few hundred bytes, into
/// `scratch` (the users new to it all held in memory: only the audience spills).
fn spilling(scratch: Scratch) -> RunOptions {
    let mut o = RunOptions::new(Trigger::Cli);
    o.spill = SpillOptions {
        scratch,
        run_bytes: 300,
        ..SpillOptions::default()
    };
    o
}

const SPEC: &str = "removal: Remove\ndelta: true";

#[tokio::test]
async fn an_audience_sorted_through_the_scratch_directory_is_the_one_sorted_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let w = World::start().await;
    w.looker.add_look("1", look(&shuffled(400)));
    let yaml = w.yaml("1", SPEC, "");
    let roomy = w.sync(&yaml, None, RunOptions::new(Trigger::Cli)).await;
    let tight = w
        .sync(&yaml, None, spilling(Scratch::new(Some(dir.path().into()))))
        .await;
    assert_eq!(
        tight.report.outcome,
        Outcome::Succeeded,
        "{:#?}",
        tight.report
    );
    assert_eq!(members(&stored(&tight)).len(), 400);
    assert_eq!(members(&stored(&roomy)), members(&stored(&tight)));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn an_audience_built_beside_its_state_file_is_saved_by_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.bin");
    let w = World::start().await;
    w.looker.add_look("1", look(&shuffled(300)));
    let yaml = w.yaml("1", SPEC, "");
    let mut opts = spilling(Scratch::new(Some(dir.path().into())));
    opts.audience_output = Output::Beside(state.clone());
    let first = w.sync(&yaml, None, opts.clone()).await;
    let built = stored(&first);
    assert!(built.in_file());
    audience::write_file(&state, &built).unwrap();
    drop((built, first));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["state.bin"]);
    let previous = audience::read_file(&state).unwrap().unwrap();
    assert!(previous.in_file());
    assert_eq!(members(&previous).len(), 300);
    // The next run reads it from the file and writes its own beside it.
    w.looker.add_look("1", look(&shuffled(250)));
    let second = w.sync(&yaml, Some(previous), opts).await;
    assert_eq!(
        (second.report.counts.removed, second.report.counts.unchanged),
        (Some(50), Some(250)),
        "{:#?}",
        second.report
    );
    audience::write_file(&state, &stored(&second)).unwrap();
    let again = audience::read_file(&state).unwrap().unwrap();
    assert_eq!(members(&again).len(), 250);
}

#[tokio::test]
async fn a_scratch_directory_that_fails_fails_the_run_keeps_the_audience_and_counts_every_row() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the directory should be: no spill file can be made in it.
    let not_a_dir = dir.path().join("scratch");
    std::fs::write(&not_a_dir, "not a directory").unwrap();
    let w = World::start().await;
    w.looker.add_look("1", look(&shuffled(200)));
    let r = w
        .sync(
            &w.yaml("1", SPEC, ""),
            None,
            spilling(Scratch::new(Some(not_a_dir.clone()))),
        )
        .await;
    assert_eq!(r.audience, AudienceUpdate::Keep);
    let report = &r.report;
    assert_eq!(report.outcome, Outcome::Failed, "{report:#?}");
    // Every row was read and sent: only the audience could not be stored.
    assert_eq!((report.counts.rows_read, report.counts.sent), (200, 200));
    let failure = report
        .errors
        .iter()
        .find(|e| e.reason == "ScratchFailed")
        .unwrap_or_else(|| panic!("{report:#?}"));
    assert!(
        failure.message.starts_with(&format!(
            "the new stored audience could not be written, so the stored audience is kept: the scratch directory {}: creating a spill file failed: ",
            not_a_dir.display()
        )),
        "{}",
        failure.message
    );
    for e in &report.errors {
        assert!(!e.message.contains("user-"), "no identifier: {}", e.message);
    }
    assert!(!report.message.contains("user-"), "{}", report.message);
}
