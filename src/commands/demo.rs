//! `braze-export-operator demo`: the sandbox Looker and Braze on loopback, the example export
//! run through the real pipeline, and what Braze received.

use serde_json::Value;

use super::load::load_export;
use crate::export::{Credentials, ExportPlan, RunOptions, Services, Trigger, run_export};
use crate::sandbox::{BrazeSandbox, Fault, Generator, Look, LookerSandbox};
use crate::secret::Secret;

/// The example export shipped in `examples/`, which the demo runs.
pub const EXAMPLE: &str = include_str!("../../examples/churn-risk.yaml");

/// Runs the demo with a Look of `rows` generated users; returns the exit code.
pub async fn demo(rows: u64) -> i32 {
    match try_demo(rows).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn try_demo(rows: u64) -> Result<i32, String> {
    let looker = LookerSandbox::start("demo-client-id", "demo-client-secret")
        .await
        .map_err(|e| e.to_string())?;
    let braze = BrazeSandbox::start("demo-api-key")
        .await
        .map_err(|e| e.to_string())?;
    let mut doc = load_export(EXAMPLE)?;
    looker.add_look(
        &doc.spec.looker.look_id,
        Look::users(rows, Generator::Dirty),
    );
    braze.inject([Fault::Status(503), Fault::RateLimited { retry_after: 1 }]);
    doc.spec.looker.base_url = looker.url.clone();
    doc.spec.braze.endpoint = braze.url.clone();
    let name = doc.metadata.name.clone().unwrap_or_default();
    let plan = ExportPlan::new(&name, &doc.spec).map_err(|e| crate::spec::join_errors(&e))?;
    println!(
        "Sandbox Looker at {} serves Look {} with {rows} users (some dirty rows: duplicates, null ids).",
        looker.url, plan.look_id
    );
    println!(
        "Sandbox Braze at {} will fail one request with 503 and rate-limit one with 429.\n",
        braze.url
    );
    let creds = Credentials {
        looker_client_id: "demo-client-id".into(),
        looker_client_secret: Secret::new("demo-client-secret"),
        braze_api_key: Some(Secret::new("demo-api-key")),
    };
    let services = Services::default();
    let report = run_export(&services, &plan, &creds, RunOptions::new(Trigger::Cli)).await;
    print!(
        "{}",
        report.to_text(&format!("Export {name} (Look {})", plan.look_id))
    );

    let requests = braze.requests();
    let accepted = braze.accepted();
    println!(
        "\nWhat Braze received: {} requests, {} objects accepted.",
        requests.len(),
        accepted.len()
    );
    for r in requests.iter().take(3) {
        println!(
            "  POST /users/track  {} objects  -> {}",
            r.objects, r.status
        );
    }
    if let Some(first) = requests.iter().find(|r| r.status < 300) {
        println!(
            "\nThe first accepted request (Authorization: Bearer <redacted>, Content-Type: {}):",
            first.content_type.as_deref().unwrap_or("")
        );
        let mut body = first.body.clone();
        if let Some(list) = body["attributes"].as_array_mut() {
            let more = list.len().saturating_sub(2);
            list.truncate(2);
            if more > 0 {
                list.push(Value::String(format!("… {more} more objects")));
            }
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    }
    println!(
        "\nReport as JSON (what `run --output json` prints):\n{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(report.outcome.exit_code())
}
