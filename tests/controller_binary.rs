//! The `controller` binary as deployed: against the fake apiserver through a kubeconfig,
//! with `/metrics`, `/healthz`, `/readyz`, SIGTERM, and no secret anywhere.

#[path = "support/fake.rs"]
mod fake;
mod support;

use std::time::Duration;

use braze_export_operator::sandbox::{Generator, Look};
use fake::Start as _;
use fake_apiserver::{self as apiserver, EVENTS, EXPORTS, FakeApiServer};
use serde_json::{Value, json};
use support::*;

const NS: &str = "marketing";

fn put_export(api: &FakeApiServer, w: &World, name: &str, key_secret: &str) {
    let yaml = w
        .yaml("42", "", "")
        .replace("name: test-export", &format!("name: {name}"))
        .replace("name: braze-api", &format!("name: {key_secret}"));
    let mut object: Value = serde_saphyr::from_str(&yaml).expect("yaml");
    object["metadata"]["annotations"] = json!({"looker-braze.dev/run-now": "go"});
    api.put(EXPORTS, object);
}

fn ready(api: &FakeApiServer, name: &str) -> (String, String) {
    let s = api
        .get(EXPORTS, NS, name)
        .map(|o| o["status"].clone())
        .unwrap_or(Value::Null);
    let c = s["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or(Value::Null);
    (
        c["reason"].as_str().unwrap_or("").to_owned(),
        c["message"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn the_binary_serves_health_and_metrics_and_leaks_nothing() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(200, Generator::Clean));
    api.put_secret(
        NS,
        "looker-api",
        &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
    );
    api.put_secret(NS, "braze-api", &[("api_key", API_KEY)]);
    api.put_secret(NS, "wrong-braze", &[("api_key", "wrong-key-do-not-leak")]);
    put_export(&api, &w, "good", "braze-api");
    put_export(&api, &w, "unauthorized", "wrong-braze");
    put_export(&api, &w, "no-secret", "absent-secret");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = api.kubeconfig();
    let mut child = tokio::process::Command::new(binary())
        .args([
            "controller",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--max-concurrent-runs",
            "2",
            // The sandbox Looker: trusted with the exports' credentials.
            "--looker-allowed-hosts=127.0.0.1",
        ])
        .env("KUBECONFIG", kubeconfig.path())
        .env("RUST_LOG", "trace")
        .env("POD_NAME", "operator-0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        let mut r = stderr;
        let _ = r.read_to_string(&mut s).await;
        s
    });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let states = [
            ready(&api, "good").0,
            ready(&api, "unauthorized").0,
            ready(&api, "no-secret").0,
        ];
        if states == ["Succeeded", "Failed", "SecretNotFound"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "statuses: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready(&api, "unauthorized")
            .1
            .contains("Braze refused the API key"),
        "{:?}",
        ready(&api, "unauthorized")
    );
    assert_eq!(
        ready(&api, "no-secret").1,
        "Secret marketing/absent-secret not found (spec.braze.apiKeySecretRef)"
    );

    let http = braze_export_operator::http::HttpClients::new()
        .get(true)
        .clone();
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("http://127.0.0.1:{port}{path}");
        async move {
            let r = http.get(url).send().await.expect("endpoint answers");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok".into()));
    assert_eq!(get("/readyz").await, (200, "ready".into()));
    let (code, metrics) = get("/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "braze_export_runs_total{outcome=\"Succeeded\"} 1",
        "braze_export_runs_total{outcome=\"Failed\"} 1",
        "braze_export_rows_total{result=\"sent\"} 200",
        "braze_export_exports{ready=\"True\",reason=\"Succeeded\"} 1",
        "braze_export_exports{ready=\"False\",reason=\"SecretNotFound\"} 1",
    ] {
        assert!(
            metrics.contains(line),
            "{line} missing from /metrics:\n{metrics}"
        );
    }

    let requests: u64 = ["good", "unauthorized"]
        .iter()
        .map(|n| {
            api.get(EXPORTS, NS, n).unwrap()["status"]["lastRun"]["requests"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(
        metrics.contains(&format!("braze_export_braze_requests_total {requests}\n")),
        "{metrics}"
    );

    // SIGTERM: a clean exit.
    let pid = child.id().expect("pid") as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let logs = logs.await.unwrap();
    assert!(logs.contains("TRACE"), "trace logging is on");
    assert!(logs.contains("shutting down"), "{logs}");

    let tokens = w.access_tokens();
    assert!(!tokens.is_empty());
    let stored = format!(
        "{:?}{:?}",
        api.list(EXPORTS)
            .iter()
            .map(|o| o["status"].clone())
            .collect::<Vec<_>>(),
        api.list(EVENTS)
    );
    for secret in [CLIENT_SECRET, API_KEY, "wrong-key-do-not-leak"]
        .into_iter()
        .map(String::from)
        .chain(tokens)
    {
        for form in [secret.clone(), apiserver::base64(secret.as_bytes())] {
            assert!(!logs.contains(&form), "{form:?} leaked into the logs");
            assert!(
                !stored.contains(&form),
                "{form:?} leaked into a status or event"
            );
        }
    }
    assert!(
        !stored.contains("user-0000"),
        "no user identifier in statuses or events"
    );
}
