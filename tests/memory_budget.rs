//! Past the users a run holds in memory, rows wait in the scratch directory and are
//! deduplicated in identifier order: over real HTTP against the sandboxes, a run that holds
//! five new users in memory sends, counts and stores exactly what one that holds them all
//! does; and a scratch directory that fails is a failed run with its reason, every row
//! still accounted for.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use braze_export_operator::export::options::SpillOptions;
use braze_export_operator::export::{Outcome, RunOptions, RunReport, RunResult, Trigger};
use braze_export_operator::sandbox::{Look, Rows};
use braze_export_operator::spill::Scratch;
use serde_json::{Value, json};
use support::*;

fn opts() -> RunOptions {
    RunOptions::new(Trigger::Cli)
}

/// Options holding five users new to the audience in memory and no previous member (every
/// row then waits, merged with the previous audience in identifier order), writing a run
/// file every few hundred bytes of waiting rows, into `dir`.
fn tight(dir: PathBuf) -> RunOptions {
    let mut o = opts();
    o.spill = SpillOptions {
        scratch: Scratch::new(Some(dir)),
        new_in_memory: 5,
        run_bytes: 400,
        previous_in_memory: 0,
    };
    o
}

/// The rows of users `ids` in this order (repeats included), each with `plan_of(i)`; a row
/// with a null identifier after every 50th.
fn look(ids: &[u64], plan_of: impl Fn(u64) -> String) -> Look {
    let fields = json!({"dimensions": [
        field("users.external_id", &["braze_id"]),
        field("users.plan", &["braze[plan]"]),
    ]});
    let mut rows = Vec::new();
    for (n, &i) in ids.iter().enumerate() {
        rows.push(row(&[
            ("users.external_id", json!(format!("user-{i:07}"))),
            ("users.plan", json!(plan_of(i))),
        ]));
        if n % 50 == 49 {
            rows.push(row(&[
                ("users.external_id", Value::Null),
                ("users.plan", json!("free")),
            ]));
        }
    }
    Look::new(fields, Rows::Fixed(rows))
}

/// Users 1 to 300 in a shuffled order, then 60 of them again.
fn shuffled() -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(16);
    let mut ids: Vec<u64> = (1..=300).collect();
    rng.shuffle(&mut ids);
    let again: Vec<u64> = (0..60).map(|_| rng.u64(1..=300)).collect();
    ids.extend(again);
    ids
}

/// Every object Braze accepted, as JSON text, sorted (repeats kept).
fn objects(w: &World) -> Vec<String> {
    let mut all: Vec<String> = w.braze.accepted().iter().map(Value::to_string).collect();
    all.sort();
    all
}

/// What a user checks of a run: outcome, counts, message and errors.
fn seen(r: &RunReport) -> (Outcome, String, String, Vec<(String, u64)>) {
    let errors = r
        .errors
        .iter()
        .map(|e| (e.reason.clone(), e.count))
        .collect();
    (
        r.outcome,
        format!("{:?}", r.counts),
        r.message.clone(),
        errors,
    )
}

#[tokio::test]
async fn a_plain_run_past_the_budget_sends_each_user_once_as_one_in_memory_does() {
    let scratch = tempfile::tempdir().unwrap();
    let (roomy, tight_world) = (World::start().await, World::start().await);
    let ids = shuffled();
    for w in [&roomy, &tight_world] {
        w.looker.add_look("1", look(&ids, |_| "free".into()));
    }
    let a = roomy.run(&roomy.yaml("1", "", "")).await;
    let b = tight_world
        .run_with(
            &tight_world.yaml("1", "", ""),
            &fast_services(),
            tight(scratch.path().into()),
        )
        .await;
    assert_eq!(
        (a.counts.sent, a.counts.duplicates, a.counts.invalid),
        (300, 60, 7)
    );
    // The object sent for a user is the one of its first row, and nobody is sent twice.
    let delivered = tight_world.delivered();
    assert_eq!(delivered.len(), 300);
    assert_eq!(
        delivered.iter().cloned().collect::<BTreeSet<_>>(),
        users(1..=300)
    );
    assert_eq!(objects(&roomy), objects(&tight_world));
    assert_eq!(seen(&a), seen(&b));
    // The run files are anonymous: nothing is left in the scratch directory.
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn an_audience_past_the_budget_is_stored_and_synced_as_one_in_memory_is() {
    let scratch = tempfile::tempdir().unwrap();
    let (roomy, tight_world) = (World::start().await, World::start().await);
    let yaml = |w: &World| w.yaml("1", "removal: Remove\ndelta: true", "");
    let ids = shuffled();
    for w in [&roomy, &tight_world] {
        w.looker.add_look("1", look(&ids, |_| "free".into()));
    }
    let first = (
        roomy.sync(&yaml(&roomy), None, opts()).await,
        tight_world
            .sync(&yaml(&tight_world), None, tight(scratch.path().into()))
            .await,
    );
    assert_eq!(seen(&first.0.report), seen(&first.1.report));
    assert_eq!(first.0.report.counts.added, Some(300));
    assert_eq!(members(&stored(&first.0)), members(&stored(&first.1)));
    assert_eq!(members(&stored(&first.1)).len(), 300);

    // The Look moves on: users 1-30 leave, 301-330 arrive, and 20 users change plan.
    let moved: Vec<u64> = ids.iter().map(|i| i + 30).collect();
    let plan_of = |i: u64| if i.is_multiple_of(15) { "pro" } else { "free" }.to_owned();
    for w in [&roomy, &tight_world] {
        w.looker.add_look("1", look(&moved, plan_of));
    }
    let before = (
        roomy.braze.accepted().len(),
        tight_world.braze.accepted().len(),
    );
    let run = |w: &'static str, r: &RunResult| (w, r.report.clone());
    let second = (
        roomy
            .sync(&yaml(&roomy), Some(stored(&first.0)), opts())
            .await,
        tight_world
            .sync(
                &yaml(&tight_world),
                Some(stored(&first.1)),
                tight(scratch.path().into()),
            )
            .await,
    );
    let (a, b) = (run("roomy", &second.0).1, run("tight", &second.1).1);
    assert_eq!(a.outcome, Outcome::Succeeded, "{a:#?}");
    assert_eq!(
        (a.counts.added, a.counts.removed, a.counts.unchanged),
        (Some(30), Some(30), Some(252)),
        "{a:#?}"
    );
    assert_eq!(seen(&a), seen(&b));
    assert_eq!(members(&stored(&second.0)), members(&stored(&second.1)));
    let since = |w: &World, n: usize| {
        let mut v: Vec<String> = w.braze.accepted()[n..]
            .iter()
            .map(Value::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(since(&roomy, before.0), since(&tight_world, before.1));
}

#[tokio::test]
async fn a_scratch_directory_that_fails_fails_the_run_and_every_row_is_counted() {
    let w = World::start().await;
    let ids = shuffled();
    w.looker.add_look("1", look(&ids, |_| "free".into()));
    let gone = tempfile::tempdir().unwrap().path().join("scratch");
    let r = w
        .run_with(&w.yaml("1", "", ""), &fast_services(), tight(gone.clone()))
        .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    // One error: the run's, with the rows that could not wait (the run stopped reading
    // there); the five users held in memory went.
    assert_eq!(r.errors.len(), 1, "{r:#?}");
    let failure = &r.errors[0];
    assert_eq!(
        (failure.reason.as_str(), failure.count),
        ("ScratchFailed", r.counts.failed)
    );
    assert!(r.counts.failed >= 1, "{r:#?}");
    assert!(
        failure.message.starts_with(&format!(
            "the scratch directory {}: creating a spill file failed: No such file or directory (os error 2): the rows that were to wait there for the end of the Look were not sent (give it more room, or another place: run --scratch-dir",
            gone.display()
        )),
        "{}",
        failure.message
    );
    assert_eq!(w.delivered().len(), 5);
    assert_eq!(r.counts.sent, 5);
    for e in &r.errors {
        assert!(!e.message.contains("user-"), "no identifier: {}", e.message);
    }
}

/// One run of a scenario: the Look, the lines under `spec.braze` and `spec`, and what the
/// sandbox Braze does.
struct Step {
    look: Look,
    braze: &'static str,
    spec: &'static str,
    failing: &'static [&'static str],
}

/// What a user checks after each run: the report, the stored audience, and who holds
/// which value in Braze.
type Outcomes = Vec<(
    (Outcome, String, String, Vec<(String, u64)>),
    std::collections::BTreeMap<String, braze_export_operator::audience::MemberState>,
    Vec<(String, BTreeSet<String>)>,
)>;

/// Runs the steps in a new world, each with the audience the last one left.
async fn drive(steps: Vec<Step>, opts_of: impl Fn() -> RunOptions) -> Outcomes {
    let w = World::start().await;
    let mut previous = None;
    let mut out = Vec::new();
    for step in steps {
        w.looker.add_look("1", step.look);
        w.braze.set_failing_ids(step.failing);
        let yaml = w.yaml("1", step.braze, step.spec);
        let result = w.sync(&yaml, previous.clone(), opts_of()).await;
        if let braze_export_operator::export::AudienceUpdate::Replace(e) = &result.audience {
            previous = Some(e.clone());
        }
        let held = ["A", "B"]
            .iter()
            .map(|v| ((*v).to_owned(), w.braze.segment("looker_export", v)))
            .collect();
        let stored = previous.as_ref().map(members).unwrap_or_default();
        out.push((seen(&result.report), stored, held));
    }
    out
}

/// The same steps, holding everything in memory and holding almost nothing: the same
/// reports, audiences and Braze.
async fn same_both_ways(steps: impl Fn() -> Vec<Step>) -> Outcomes {
    let scratch = tempfile::tempdir().unwrap();
    let roomy = drive(steps(), opts).await;
    let tight_ = drive(steps(), || tight(scratch.path().into())).await;
    for (i, (a, b)) in roomy.iter().zip(&tight_).enumerate() {
        assert_eq!(a, b, "run {}", i + 1);
    }
    roomy
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(*range.start());
    let mut v: Vec<u64> = range.collect();
    rng.shuffle(&mut v);
    v
}

fn free(_: u64) -> String {
    "free".into()
}

#[tokio::test]
async fn a_change_of_flag_moves_everyone_to_the_new_one_as_in_memory() {
    let out = same_both_ways(|| {
        vec![
            Step {
                look: look(&ids(1..=120), free),
                braze: "removal: Remove\ndelta: true\nexportName: A",
                spec: "",
                failing: &[],
            },
            Step {
                look: look(&ids(11..=130), free),
                braze: "removal: Remove\ndelta: true\nexportName: B",
                spec: "",
                failing: &[],
            },
        ]
    })
    .await;
    let (_, _, held) = &out[1];
    assert!(held[0].1.is_empty(), "nobody keeps A");
    assert_eq!(held[1].1, users(11..=130));
}

#[tokio::test]
async fn rows_past_max_rows_keep_their_users_as_in_memory() {
    let out = same_both_ways(|| {
        vec![
            Step {
                look: look(&ids(1..=100), free),
                braze: "removal: Remove\nexportName: A",
                spec: "",
                failing: &[],
            },
            Step {
                look: look(&ids(1..=100), free),
                braze: "removal: Remove\nexportName: A",
                spec: "maxRows: 60",
                failing: &[],
            },
        ]
    })
    .await;
    let ((outcome, counts, ..), stored, held) = &out[1];
    assert_eq!(*outcome, Outcome::PartiallySucceeded, "{counts}");
    assert!(counts.contains("removed: Some(0)"), "{counts}");
    assert_eq!(stored.len(), 100);
    assert_eq!(held[0].1, users(1..=100));
}

#[tokio::test]
async fn the_removal_limit_holds_as_in_memory() {
    let out = same_both_ways(|| {
        vec![
            Step {
                look: look(&ids(1..=100), free),
                braze: "removal: Remove\nexportName: A",
                spec: "",
                failing: &[],
            },
            Step {
                look: look(&ids(1..=40), free),
                braze: "removal: Remove\nexportName: A",
                spec: "",
                failing: &[],
            },
        ]
    })
    .await;
    let ((_, counts, _, errors), stored, _) = &out[1];
    assert!(counts.contains("removal_withheld: Some(60)"), "{counts}");
    assert!(
        errors
            .iter()
            .any(|(r, n)| r == "RemovalLimitExceeded" && *n == 60)
    );
    assert_eq!(stored.len(), 100);
}

#[tokio::test]
async fn failed_adds_stay_pending_and_go_again_as_in_memory() {
    let out = same_both_ways(|| {
        let step = |failing| Step {
            look: look(&ids(1..=80), |i| if i < 40 { "free" } else { "pro" }.into()),
            braze: "delta: true\nbatchSize: 1\nexportName: A",
            spec: "",
            failing,
        };
        vec![
            step(&["user-0000003", "user-0000050"]),
            step(&[]),
            step(&[]),
        ]
    })
    .await;
    use braze_export_operator::audience::MemberState::Pending;
    let (_, first, _) = &out[0];
    assert_eq!(first.values().filter(|s| **s == Pending).count(), 2);
    let ((_, counts, ..), second, held) = &out[1];
    assert!(counts.contains("sent: 2,"), "{counts}");
    assert!(second.values().all(|s| *s != Pending));
    assert_eq!(held[0].1, users(1..=80));
    let ((_, counts, ..), ..) = &out[2];
    assert!(
        counts.contains("sent: 0,") && counts.contains("unchanged: Some(80)"),
        "{counts}"
    );
}

#[tokio::test]
async fn rows_that_only_keep_their_users_are_counted_once_when_the_scratch_fails() {
    let w = World::start().await;
    let yaml = w.yaml("1", "removal: Remove", "");
    w.looker.add_look("1", look(&ids(1..=40), free));
    let first = w.sync(&yaml, None, opts()).await;
    // Every row lacks its attribute: invalid, but its user is still in the Look. Merged
    // with a previous audience, each waits as such; the scratch directory then fails.
    let fields = json!({"dimensions": [
        field("users.external_id", &["braze_id"]),
        field("users.plan", &["braze[plan]"]),
    ]});
    let rows = (1..=40)
        .map(|i| row(&[("users.external_id", json!(format!("user-{i:07}")))]))
        .collect();
    w.looker.add_look("1", Look::new(fields, Rows::Fixed(rows)));
    let gone = tempfile::tempdir().unwrap().path().join("scratch");
    let second = w.sync(&yaml, Some(stored(&first)), tight(gone)).await;
    let r = &second.report;
    // `sync` asserts the counts add up; these rows were counted invalid, never failed too.
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!(r.counts.failed, 0, "{r:#?}");
    assert!(
        r.counts.invalid >= 1 && r.counts.rows_read == r.counts.invalid,
        "{r:#?}"
    );
    assert_eq!(r.counts.removed, Some(0));
}
