//! `braze-export-operator demo`: the sandbox Looker and Braze on loopback, the example export
//! run twice through the real pipeline with `removal: Remove`, what Braze received, and the
//! segment after each run (users leaving it after the second).

use serde_json::Value;

use super::load::load_export;
use crate::audience::Owner;
use crate::export::{
    AudienceInput, AudienceUpdate, Credentials, ExportPlan, RunOptions, Services, Trigger,
    run_export_synced,
};
use crate::redacted::Redacted;
use crate::sandbox::{BrazeSandbox, Fault, Generator, Look, LookerSandbox};
use crate::spec::RemovalMode;

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
    // The demo mirrors the Look: users who leave it lose the flag.
    doc.spec.braze.removal = RemovalMode::Remove;
    let name = doc.metadata.name.clone().unwrap_or_default();
    let plan = ExportPlan::new(&name, &doc.spec).map_err(|e| crate::spec::join_errors(&e))?;
    let (attribute, flag) = (plan.shape.attribute.clone(), plan.shape.export_name.clone());
    println!(
        "Sandbox Looker at {} serves Look {} with {rows} users (some dirty rows: duplicates, null ids).",
        looker.url, plan.look_id
    );
    println!(
        "Sandbox Braze at {} will fail one request with 503 and rate-limit one with 429.",
        braze.url
    );
    println!(
        "The export runs with removal: Remove, twice: users who leave the Look lose the flag.\n"
    );
    let creds = Credentials {
        looker_client_id: "demo-client-id".into(),
        looker_client_secret: Redacted::new("demo-client-secret"),
        braze_api_key: Some(Redacted::new("demo-api-key")),
    };
    let services = Services::default();
    let owner = Owner {
        namespace: doc.metadata.namespace.clone(),
        name: name.clone(),
    };
    let title = format!("Export {name} (Look {})", plan.look_id);

    println!("== Run 1 ==");
    let input = AudienceInput {
        owner: owner.clone(),
        previous: None,
        pending_log: None,
    };
    let first = run_export_synced(&services, &plan, &creds, opts(), Some(input)).await;
    print!("{}", first.report.to_text(&title));
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
        println!("{}", shortened(&first.body));
    }
    let before = braze.segment(&attribute, &flag);
    println!(
        "\nThe segment `{attribute} includes {flag}` now holds {} users.",
        before.len()
    );
    let AudienceUpdate::Replace(state) = first.audience else {
        println!("The run kept no audience; the second run is skipped.");
        return Ok(first.report.outcome.exit_code());
    };
    println!(
        "The stored audience: {} users, {} bytes compressed.\n",
        state.header().members,
        state.len_bytes()
    );

    // The Look moves on: its first 5% of users leave, as many new ones join.
    let shift = (rows / 20).max(1);
    looker.add_look(&plan.look_id, Look::users(rows, Generator::Shifted(shift)));
    println!("== Run 2: the Look moved on by {shift} users ==");
    let seen = braze.requests().len();
    let input = AudienceInput {
        owner,
        previous: Some(state),
        pending_log: None,
    };
    let second = run_export_synced(&services, &plan, &creds, opts(), Some(input)).await;
    print!("{}", second.report.to_text(&title));
    let removal = braze.requests()[seen..]
        .iter()
        .find(|r| r.status < 300 && r.body.to_string().contains("\"remove\""))
        .map(|r| r.body.clone());
    if let Some(body) = removal {
        println!("\nA removal request:\n{}", shortened(&body));
    }
    let after = braze.segment(&attribute, &flag);
    let left: Vec<&String> = before.difference(&after).collect();
    let joined: Vec<&String> = after.difference(&before).collect();
    println!(
        "\nThe segment `{attribute} includes {flag}` now holds {} users: {} left it ({}), {} joined ({}).",
        after.len(),
        left.len(),
        sample(&left),
        joined.len(),
        sample(&joined)
    );
    if let Some(gone) = left.first() {
        println!(
            "{gone} in Braze: {attribute} = {:?}",
            braze.array(gone, &attribute).unwrap_or_default()
        );
    }
    println!(
        "\nReport of run 2 as JSON (what `run --output json` prints):\n{}",
        serde_json::to_string_pretty(&second.report).unwrap_or_default()
    );
    let code = first
        .report
        .outcome
        .exit_code()
        .max(second.report.outcome.exit_code());
    Ok(code)
}

fn opts() -> RunOptions {
    RunOptions::new(Trigger::Cli)
}

/// A request body with its attributes cut to two, for printing.
fn shortened(body: &Value) -> String {
    let mut body = body.clone();
    if let Some(list) = body["attributes"].as_array_mut() {
        let more = list.len().saturating_sub(2);
        list.truncate(2);
        if more > 0 {
            list.push(Value::String(format!("… {more} more objects")));
        }
    }
    serde_json::to_string_pretty(&body).unwrap_or_default()
}

/// The first three of a list, and how many more.
fn sample(ids: &[&String]) -> String {
    let mut s: Vec<String> = ids.iter().take(3).map(|i| (*i).clone()).collect();
    if ids.len() > 3 {
        s.push(format!("… {} more", ids.len() - 3));
    }
    s.join(", ")
}
