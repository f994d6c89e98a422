//! A BrazeExport is no window into its namespace: whoever may patch an export (the README's
//! `bzx-trigger` Role) cannot make the operator send another Secret's values to a Looker host
//! nobody trusted with them.

#[path = "support/fake.rs"]
mod fake;
#[path = "support/operator.rs"]
mod operator;
mod support;

use braze_export_operator::controller::Config;
use braze_export_operator::looker::AllowedHosts;
use braze_export_operator::sandbox::{Generator, Look};
use fake::Start as _;
use fake_apiserver::{EVENTS, EXPORTS, FakeApiServer, Rule};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use operator::*;
use serde_json::{Value, json};
use support::*;

/// A database password in the export's namespace, in a Secret no export should read.
const DB_PASSWORD: &str = "app-db-password-do-not-leak";

/// The rules of the README's `bzx-trigger` Role, as a user copies them.
fn trigger_role_rules() -> Vec<Rule> {
    #[derive(serde::Deserialize)]
    struct Role {
        rules: Vec<Rule>,
    }
    let readme = include_str!("../README.md");
    let block = readme
        .split("```yaml\n")
        .find(|b| b.contains("name: bzx-trigger"))
        .and_then(|b| b.split("```").next())
        .expect("the README shows the bzx-trigger Role");
    serde_saphyr::from_str::<Role>(block)
        .expect("the Role is YAML")
        .rules
}

/// Patches export `name` as a client held to the trigger Role.
async fn patch_as_trigger(api: &FakeApiServer, name: &str, patch: Value) {
    let client = api.client_with_rules(trigger_role_rules());
    let gvk = GroupVersionKind::gvk("looker-braze.dev", "v1alpha1", "BrazeExport");
    let exports: Api<DynamicObject> =
        Api::namespaced_with(client, NS, &ApiResource::from_gvk(&gvk));
    exports
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the trigger Role may patch an export");
}

fn everything_written(api: &FakeApiServer, name: &str) -> String {
    let mut all = serde_json::to_string(&status(api, name)).unwrap();
    for e in api.list(EVENTS) {
        all.push_str(&e.to_string());
    }
    all
}

#[tokio::test]
async fn a_patched_export_cannot_send_another_secret_to_its_looker() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(20, Generator::Clean));
    secrets(&api);
    api.put_secret(NS, "app-db", &[("password", DB_PASSWORD)]);
    put_export(&api, &w, "churn", "42", "", "");
    // The operator allows any Looker host (the chart's default): it trusts none with
    // credentials by itself; the Looker Secret of the tests allows the sandbox's host.
    let op = Operator::start(&api, config());
    run_now(&api, "churn", "r1");
    wait_ready(&api, "churn", "Succeeded", 20).await;
    let logins = || w.looker.requests_to("/login").len();
    assert_eq!(logins(), 1, "the export's own Secret is used");

    patch_as_trigger(
        &api,
        "churn",
        json!({
            "metadata": {"annotations": {"looker-braze.dev/run-now": "r2"}},
            "spec": {"looker": {"credentialsSecretRef": {
                "name": "app-db", "clientIdKey": "password", "clientSecretKey": "password"
            }}}
        }),
    )
    .await;
    let s = wait_ready(&api, "churn", "CredentialsNotAllowed", 20).await;
    let ready = condition(&s, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(
        ready["message"],
        "Looker host 127.0.0.1 may not receive the credentials in Secret marketing/app-db (spec.looker.credentialsSecretRef): allow it for every export with the operator's --looker-allowed-hosts (the chart's looker.allowedHosts), or for this Secret alone with its annotation looker-braze.dev/allowed-hosts: 127.0.0.1"
    );
    assert_eq!(logins(), 1, "nothing was posted to Looker");
    let reads: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET") && r.contains("/secrets/app-db"))
        .collect();
    assert!(
        !reads.is_empty() && reads.iter().all(|r| r.ends_with(" (metadata)")),
        "the Secret's values were never read, only its metadata: {reads:?}"
    );
    let posted: Vec<String> = w
        .looker
        .requests()
        .iter()
        .flat_map(|r| r.form.iter().map(|(_, v)| v.clone()))
        .collect();
    assert!(!posted.iter().any(|v| v == DB_PASSWORD), "{posted:?}");
    // The Event follows the status write.
    wait_for("the CredentialsNotAllowed Warning", 10, || {
        events(&api, "churn")
            .iter()
            .any(|(kind, reason, _)| kind == "Warning" && reason == "CredentialsNotAllowed")
            .then_some(())
    })
    .await;
    assert!(!everything_written(&api, "churn").contains(DB_PASSWORD));
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    op.stop().await;
}

#[tokio::test]
async fn the_operator_s_own_list_or_the_secret_s_annotation_allows_the_host() {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    w.looker.add_look("42", Look::users(20, Generator::Clean));
    secrets(&api);
    // A Looker Secret without the annotation.
    api.put_secret(
        NS,
        "plain-looker",
        &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
    );
    put_export(&api, &w, "churn", "42", "", "");
    api.patch(
        EXPORTS,
        NS,
        "churn",
        json!({"spec": {"looker": {"credentialsSecretRef": {"name": "plain-looker"}}}}),
    );
    // Trusted by the operator's list: no annotation needed.
    let trusting = Config {
        allowed_hosts: AllowedHosts::parse("127.0.0.1").unwrap(),
        ..config()
    };
    let op = Operator::start(&api, trusting);
    run_now(&api, "churn", "r1");
    wait_ready(&api, "churn", "Succeeded", 20).await;
    op.stop().await;

    // Without the list, the Secret must name the host.
    let op = Operator::start(&api, config());
    run_now(&api, "churn", "r2");
    wait_ready(&api, "churn", "CredentialsNotAllowed", 20).await;
    allow_looker_host(&api, "plain-looker");
    run_now(&api, "churn", "r3");
    let s = wait_ready(&api, "churn", "Succeeded", 20).await;
    assert_eq!(s["lastHandledRunRequest"], "r3");
    assert_eq!(w.looker.requests_to("/login").len(), 2);
    op.stop().await;
}
