//! Every part of Looker's answer is bounded in memory: the real `run` binary against the
//! sandbox, fed a 20 MB array cell or a 20 MB `pivots` section, measured by its own peak RSS
//! (from `wait4`'s rusage, so other tests in this process do not count).

#![cfg(unix)]

mod support;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use braze_export_operator::sandbox::{Generator, Look};
use serde_json::Value;
use support::*;

/// The bar for a whole run's peak RSS (SPEC section 6).
const MAX_PEAK_RSS_MIB: f64 = 64.0;
/// What each oversized part weighs on the wire.
const HUGE_BYTES: u64 = 20_000_000;

/// One run of the binary: exit code, the report, stderr and the peak RSS.
struct Measured {
    code: Option<i32>,
    report: Value,
    stderr: String,
    peak_rss_mib: f64,
}

/// Runs `run --file <spec> --output json` in a child and reaps it with `wait4` for its peak
/// RSS (on a blocking thread: the sandboxes keep serving meanwhile).
async fn measured_run(yaml: &str) -> Measured {
    let spec = write_spec(yaml);
    let path = spec.path().to_owned();
    tokio::task::spawn_blocking(move || run_and_reap(&path))
        .await
        .expect("the measuring thread")
}

#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, which also gives its peak RSS"
)]
fn run_and_reap(spec: &std::path::Path) -> Measured {
    let mut child = Command::new(binary())
        .args(["run", "--file"])
        .arg(spec)
        .args(["--output", "json"])
        .env("LOOKERSDK_CLIENT_ID", CLIENT_ID)
        .env("LOOKERSDK_CLIENT_SECRET", CLIENT_SECRET)
        .env("BRAZE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // A run that never ends (say, a deadline that does not work) fails the test instead of
    // hanging it: killed after a minute, its report is not JSON.
    let reaped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let reaped = std::sync::Arc::clone(&reaped);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(60));
            if !reaped.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: pid is our own child, not yet reaped (so not reused).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain old data, and pid is our own child, not yet reaped.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    reaped.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(watchdog);
    assert_eq!(waited, pid, "wait4 failed");
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    let code = std::process::ExitStatus::from_raw(status).code();
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("report is not JSON ({e}), exit {code:?}: {stdout}\nstderr: {stderr}")
    });
    Measured {
        code,
        report,
        stderr,
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mb_array_cell_makes_its_row_invalid_and_costs_no_memory() {
    let w = World::start().await;
    let mut look = Look::users(1000, Generator::Clean);
    look.huge_array_cell = Some((500, HUGE_BYTES));
    w.looker.add_look("huge-cell", look);
    let m = measured_run(&w.yaml("huge-cell", "", "")).await;
    eprintln!(
        "20 MB array cell: peak RSS {:.1} MiB, exit {:?}",
        m.peak_rss_mib, m.code
    );
    let r = &m.report;
    assert_eq!(m.code, Some(0), "{r}\nstderr: {}", m.stderr);
    for (k, v) in [("rowsRead", 1000), ("sent", 999), ("invalid", 1)] {
        assert_eq!(r[k], v, "{k}: {r}");
    }
    assert_eq!(r["outcome"], "Succeeded", "{r}");
    assert_eq!(r["errors"][0]["reason"], "ValueTooLarge", "{r}");
    assert_eq!(r["errors"][0]["count"], 1, "{r}");
    assert_eq!(
        r["errors"][0]["message"],
        "row 500 has a users.first_name value too large to keep (an array or object over 256 KiB, or a value past the 1 MiB a row may take)",
        "{r}"
    );
    let sent = w.braze.requests();
    assert!(
        sent.iter()
            .flat_map(|t| t.body["attributes"].as_array().unwrap().iter())
            .all(|o| o["external_id"] != "user-0000500"),
        "the row with the oversized cell is not sent, not even cut"
    );
    assert!(
        m.peak_rss_mib < MAX_PEAK_RSS_MIB,
        "peak RSS {:.1} MiB",
        m.peak_rss_mib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mb_pivots_section_fails_the_run_as_pivoted_and_costs_no_memory() {
    let w = World::start().await;
    let mut look = Look::users(10, Generator::Clean);
    look.huge_pivots = Some(HUGE_BYTES);
    w.looker.add_look("huge-pivots", look);
    let m = measured_run(&w.yaml("huge-pivots", "", "")).await;
    eprintln!(
        "20 MB pivots: peak RSS {:.1} MiB, exit {:?}",
        m.peak_rss_mib, m.code
    );
    let r = &m.report;
    assert_eq!(m.code, Some(1), "{r}\nstderr: {}", m.stderr);
    assert_eq!(r["errors"][0]["reason"], "PivotNotSupported", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("pivots are not supported"),
        "{r}"
    );
    assert_eq!(w.braze.request_count(), 0);
    assert!(
        m.peak_rss_mib < MAX_PEAK_RSS_MIB,
        "peak RSS {:.1} MiB",
        m.peak_rss_mib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_a_byte_at_a_time_is_stopped_at_the_run_s_deadline() {
    // A byte every 20 ms never trips timeoutSeconds (each wait is short), and the body would
    // take hours: only the whole run's deadline ends it.
    let w = World::start().await;
    let mut look = Look::users(1000, Generator::Clean);
    look.trickle = Some(std::time::Duration::from_millis(20));
    w.looker.add_look("trickle", look);
    let started = std::time::Instant::now();
    let m = measured_run(&w.yaml_looker(
        "trickle",
        "timeoutSeconds: 5",
        "",
        "activeDeadlineSeconds: 3",
    ))
    .await;
    let took = started.elapsed();
    eprintln!(
        "trickling body: stopped after {took:?}, peak RSS {:.1} MiB, exit {:?}",
        m.peak_rss_mib, m.code
    );
    let r = &m.report;
    assert_eq!(m.code, Some(1), "{r}\nstderr: {}", m.stderr);
    assert_eq!(r["outcome"], "Failed", "{r}");
    assert_eq!(r["errors"][0]["reason"], "DeadlineExceeded", "{r}");
    assert!(
        took < std::time::Duration::from_secs(10),
        "stopped at its deadline, took {took:?}"
    );
    assert!(
        m.peak_rss_mib < MAX_PEAK_RSS_MIB,
        "peak RSS {:.1} MiB",
        m.peak_rss_mib
    );
}
