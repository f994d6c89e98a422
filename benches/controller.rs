//! The controller benchmark: the real binary against the project's fake apiserver (in this
//! process) with the sandbox Looker and Braze. Measures idle RSS with 0 exports (bar: at most
//! 32 MiB), RSS with 1,000 exports, and how late scheduled runs start when 1,000 fall due in
//! the same minute.
//!
//! `cargo bench --bench controller [-- --exports N --max-concurrent-runs K]`

#[path = "../tests/support/fake.rs"]
mod fake;

use std::time::{Duration, Instant};

use braze_export_operator::sandbox::{BrazeSandbox, Generator, Look, LookerSandbox};
use fake::Start as _;
use fake_apiserver::{EXPORTS, FakeApiServer};
use serde_json::{Value, json};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let exports: usize = arg("--exports")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let concurrency = arg("--max-concurrent-runs").unwrap_or_else(|| "4".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let api = FakeApiServer::start().await;
        // Measure the controller, not the fake's schema, CEL and bookkeeping.
        api.lightweight();
        let looker = LookerSandbox::start("bench-id", "bench-secret").await.unwrap();
        let braze = BrazeSandbox::start("bench-key").await.unwrap();
        braze.set_recording(false);
        braze.set_storing(false);
        looker.add_look("42", Look::users(10, Generator::Clean));
        api.put_secret("bench", "looker-api", &[("client_id", "bench-id"), ("client_secret", "bench-secret")]);
        api.put_secret("bench", "braze-api", &[("api_key", "bench-key")]);
        let kubeconfig = api.kubeconfig();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_braze-export-operator"))
            .args(["controller", "--metrics-addr", &format!("127.0.0.1:{port}"), "--max-concurrent-runs", &concurrency, "--looker-allowed-hosts=127.0.0.1"])
            .env("KUBECONFIG", kubeconfig.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let pid = child.id().expect("pid");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = rss_mib(pid, "VmRSS:");
        println!("idle controller, 0 exports: RSS {idle:.1} MiB (bar ≤ 32: {})", if idle <= 32.0 { "ok" } else { "MISSED" });

        // 1,000 exports, every one due at the next minute.
        let now = jiff::Timestamp::now();
        let secs_to_minute = 60 - now.as_second().rem_euclid(60);
        if secs_to_minute < 20 {
            tokio::time::sleep(Duration::from_secs(secs_to_minute as u64 + 1)).await;
        }
        for i in 0..exports {
            api.put(EXPORTS, json!({
                "apiVersion": "looker-braze.dev/v1alpha1", "kind": "BrazeExport",
                "metadata": {"name": format!("export-{i:04}"), "namespace": "bench"},
                "spec": {
                    "schedule": "* * * * *",
                    "startingDeadlineSeconds": 3600,
                    "looker": {"baseUrl": looker.url, "lookId": "42", "credentialsSecretRef": {"name": "looker-api"}},
                    "braze": {"endpoint": braze.url, "apiKeySecretRef": {"name": "braze-api"}}
                }
            }));
        }
        let created = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("controller with {exports} exports before their first run: RSS {:.1} MiB", rss_mib(pid, "VmRSS:"));
        let pending = |api: &FakeApiServer| api.list(EXPORTS).iter().filter(|o| o["status"]["lastRun"]["outcome"] != "Succeeded").count();
        while pending(&api) > 0 {
            assert!(created.elapsed() < Duration::from_secs(240), "{} exports still pending", pending(&api));
            // Rarely: each look clones every export (times come from the status, not from here).
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let mut lateness: Vec<f64> = api
            .list(EXPORTS)
            .iter()
            .map(|o: &Value| {
                let due: jiff::Timestamp = o["status"]["lastScheduleTime"].as_str().unwrap().parse().unwrap();
                let started: jiff::Timestamp = o["status"]["lastRun"]["startTime"].as_str().unwrap().parse().unwrap();
                started.duration_since(due).as_secs_f64()
            })
            .collect();
        lateness.sort_by(f64::total_cmp);
        let finished = api
            .list(EXPORTS)
            .iter()
            .map(|o| o["status"]["lastRun"]["completionTime"].as_str().unwrap().parse::<jiff::Timestamp>().unwrap())
            .max()
            .unwrap();
        let due: jiff::Timestamp = api.list(EXPORTS)[0]["status"]["lastScheduleTime"].as_str().unwrap().parse().unwrap();
        println!(
            "{exports} exports due at {due}: start delay p50 {:.2} s, p95 {:.2} s, max {:.2} s; all {exports} finished {:.1} s after they were due (--max-concurrent-runs {concurrency})",
            percentile(&lateness, 0.5),
            percentile(&lateness, 0.95),
            lateness[lateness.len() - 1],
            finished.duration_since(due).as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!(
            "controller with {exports} exports: RSS {:.1} MiB idle after the runs, peak {:.1} MiB",
            rss_mib(pid, "VmRSS:"),
            rss_mib(pid, "VmHWM:")
        );
        let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(1);
        for round in 2..=rounds {
            // Every export runs again at the next minute: RSS must not grow round after round.
            let before: Vec<String> = api.list(EXPORTS).iter().map(|o| o["status"]["lastScheduleTime"].as_str().unwrap_or("").to_owned()).collect();
            while api.list(EXPORTS).iter().zip(&before).any(|(o, b)| o["status"]["lastScheduleTime"].as_str() == Some(b.as_str()) || o["status"]["lastRun"]["outcome"] != "Succeeded") {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            println!("after round {round} of {exports} runs: RSS {:.1} MiB, peak {:.1} MiB", rss_mib(pid, "VmRSS:"), rss_mib(pid, "VmHWM:"));
        }
        let _ = child.kill().await;
        if idle > 32.0 {
            std::process::exit(1);
        }
    });
}
