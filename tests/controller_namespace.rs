//! A namespace deleted with its exports (`kubectl delete namespace`, a GitOps prune of the
//! whole folder): the namespace controller deletes every kind at once, and refuses every new
//! object (Events too) while it terminates. An export with `cleanupOnDelete` still removes its
//! flag from its whole audience (its Braze key Secret is held until the cleanup has read it),
//! its result is in its status, the operator's log and the metrics, and the namespace goes.

#[path = "support/fake.rs"]
mod fake;
#[path = "support/operator.rs"]
mod operator;
mod support;

use std::sync::{Arc, Mutex};

use braze_export_operator::sandbox::{Generator, Look};
use fake::Start as _;
use fake_apiserver::{EVENTS, EXPORTS, FakeApiServer, NAMESPACES, Rule, SECRETS};
use operator::*;
use serde_json::{Value, json};
use support::*;

const FINALIZER: &str = "looker-braze.dev/cleanup";

/// What the operator logs, kept for the test to read (the runtime is one thread: the
/// controller's tasks log on it).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    /// Collects every log line of this thread until the guard is dropped.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("info")
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The namespace `marketing` (as an object), its two Secrets, and export `mirror` (`removal:
/// Remove`, `cleanupOnDelete: true`) on a Look of `users`, run once by an operator of
/// `client`: its audience stored and flagged.
async fn flagged(users: u64, client: impl FnOnce(&FakeApiServer) -> kube::Client) -> Setup {
    let (api, w) = (FakeApiServer::start().await, World::start().await);
    api.put(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    );
    w.looker
        .add_look("42", Look::users(users, Generator::Clean));
    secrets(&api);
    put_export(
        &api,
        &w,
        "mirror",
        "42",
        "removal: Remove",
        "cleanupOnDelete: true",
    );
    let op = Operator::start_with(client(&api), config());
    run_now(&api, "mirror", "r1");
    wait_ready(&api, "mirror", "Succeeded", 20).await;
    Setup { api, w, op }
}

struct Setup {
    api: FakeApiServer,
    w: World,
    op: Operator,
}

/// Waits until the namespace and everything in it are gone.
async fn namespace_gone(api: &FakeApiServer) {
    let left = |api: &FakeApiServer| -> Vec<String> {
        [EXPORTS, SECRETS, EVENTS]
            .iter()
            .flat_map(|r| api.list(r))
            .filter(|o| o["metadata"]["namespace"] == NS)
            .map(|o| format!("{} {}", o["kind"], o["metadata"]["name"]))
            .collect()
    };
    let gone = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        wait_for("the namespace to go", 31, || {
            api.get(NAMESPACES, "", NS).is_none().then_some(())
        }),
    )
    .await;
    assert!(gone.is_ok(), "stuck in Terminating: {:?}", left(api));
    assert!(left(api).is_empty(), "{:?}", left(api));
}

/// The export `mirror` as it was when it was removed.
fn last_state(api: &FakeApiServer) -> Value {
    api.removed()
        .into_iter()
        .find(|(r, o)| r == EXPORTS && o["metadata"]["name"] == "mirror")
        .map(|(_, o)| o)
        .expect("the export was removed")
}

/// Where each object of `marketing` is in the order of removals, by `kind name`.
fn removal_order(api: &FakeApiServer) -> Vec<String> {
    api.removed()
        .into_iter()
        .filter(|(_, o)| o["metadata"]["namespace"] == NS)
        .map(|(_, o)| {
            format!(
                "{} {}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The identifiers Braze took the flag off, with repeats.
fn removals(w: &World) -> Vec<String> {
    let mut ids: Vec<String> = w
        .braze
        .accepted()
        .iter()
        .filter(|o| o["looker_export"]["remove"] == json!(["LOOKER_EXPORT"]))
        .map(identifier)
        .collect();
    ids.sort();
    ids
}

/// `kubectl delete namespace marketing` with an export holding a cleanup: its Braze key
/// Secret is held with the cleanup finalizer, so the cleanup still reads it and removes the
/// flag from all 250 users; the namespace refuses the Event, so the result is in the
/// export's status (written while it terminates), one log line and the metrics; then every
/// finalizer goes and so does the namespace.
#[tokio::test]
async fn a_namespace_deletion_cleans_up_with_the_held_key_and_records_the_result() {
    let log = Log::default();
    let _guard = log.capture();
    let Setup { api, w, op } = flagged(250, |api| api.client_with_rules(chart_rules())).await;
    let flagged = w.delivered_set();
    assert_eq!(flagged.len(), 250);
    wait_for("the key Secret to be held", 10, || {
        let s = api.get(SECRETS, NS, "braze-api")?;
        (s["metadata"]["finalizers"] == json!([FINALIZER])).then_some(())
    })
    .await;
    assert!(
        api.get(SECRETS, NS, "looker-api").unwrap()["metadata"]["finalizers"].is_null(),
        "only the Braze key is needed by a cleanup"
    );
    let before = api.requests().len();

    api.delete_namespace(NS);
    namespace_gone(&api).await;

    // Braze: every user of the audience lost the flag, once.
    let removed = removals(&w);
    assert_eq!(removed, flagged.iter().cloned().collect::<Vec<_>>());
    assert_eq!(w.braze.segment("looker_export", "LOOKER_EXPORT").len(), 0);
    // The key was there for the cleanup: read after the deletion, gone only after the export.
    assert!(
        api.requests()[before..]
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/marketing/secrets/braze-api")),
        "the cleanup read the key"
    );
    let order = removal_order(&api);
    let at = |what: &str| order.iter().position(|o| o == what).expect(what);
    assert!(
        at("BrazeExport mirror") < at("Secret braze-api"),
        "the key went before the cleanup ended: {order:?}"
    );
    // The status, written on the terminating export.
    let last = last_state(&api);
    let status = &last["status"];
    assert_eq!(status["lastRun"]["trigger"], "Deletion", "{status}");
    assert_eq!(status["lastRun"]["outcome"], "Succeeded", "{status}");
    assert_eq!(status["lastRun"]["removed"], 250, "{status}");
    let running = condition(status, "Running");
    assert_eq!(running["status"], "False", "{status}");
    assert_eq!(running["reason"], "CleanedUp", "{status}");
    assert_eq!(
        running["message"],
        "removed LOOKER_EXPORT from looker_export for all 250 users of the stored audience"
    );
    assert!(last["metadata"]["deletionTimestamp"].is_string());
    // The Event could not be created: the namespace refuses new objects.
    assert!(
        api.list(EVENTS).iter().all(|e| e["reason"] != "CleanedUp"),
        "no Event can exist in a terminating namespace"
    );
    // One log line.
    let ended: Vec<String> = log
        .lines()
        .into_iter()
        .filter(|l| l.contains("the cleanup ended"))
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    for part in [
        " INFO ",
        "export=\"marketing/mirror\"",
        "outcome=\"CleanedUp\"",
        "removed=250",
        "members=250",
        "kept=0",
    ] {
        assert!(ended[0].contains(part), "{part} in {}", ended[0]);
    }
    // The metrics.
    assert_eq!(
        op.metric("braze_export_cleanups_total{result=\"CleanedUp\"}"),
        Some(1.0)
    );
    assert_eq!(
        op.metric("braze_export_rows_total{result=\"removed\"}"),
        Some(250.0)
    );
    assert!(api.denied().is_empty(), "{:?}", api.denied());
    let everything = format!("{:?}{:?}", api.writes(), log.lines());
    assert!(!everything.contains(API_KEY), "the key leaks nowhere");
    op.stop().await;
}

/// The chart's rules, but `patch` on Secrets only for the audience of `mirror` (a tenant's
/// Role that does not let the operator touch the team's own Secrets).
fn tenant_rules() -> Vec<Rule> {
    let mut rules = chart_rules();
    for r in &mut rules {
        if r.resources == ["secrets"] {
            r.verbs.retain(|v| v != "patch");
        }
    }
    rules.push(Rule {
        api_groups: vec![String::new()],
        resources: vec!["secrets".into()],
        verbs: vec!["patch".into()],
        resource_names: [
            "mirror-audience",
            "mirror-audience-1-0",
            "mirror-audience-2-0",
        ]
        .map(String::from)
        .to_vec(),
    });
    rules
}

/// An operator that may not patch the Braze key Secret says so once (a Warning naming the
/// Secret), runs as before, and a namespace deletion ends as before this hold existed: the key
/// may go first, and the export's status says the flag stayed.
#[tokio::test]
async fn without_rights_on_the_key_the_export_warns_and_goes_on() {
    let Setup { api, w, op } = flagged(40, |api| api.client_with_rules(tenant_rules())).await;
    let warning = wait_event(&api, "mirror", "BrazeKeyNotHeld", 10).await;
    assert_eq!(warning.0, "Warning");
    assert!(
        warning
            .2
            .starts_with("cannot hold Secret marketing/braze-api (spec.braze.apiKeySecretRef) with the finalizer looker-braze.dev/cleanup"),
        "{}",
        warning.2
    );
    // Runs go on, and the hold is not tried on every look.
    run_now(&api, "mirror", "r2");
    wait_for("the second run", 20, || {
        let s = status(&api, "mirror");
        (s["lastHandledRunRequest"] == "r2" && s["lastRun"]["outcome"] == "Succeeded").then_some(())
    })
    .await;
    let refused = |api: &FakeApiServer| {
        api.denied()
            .iter()
            .filter(|d| *d == "patch /secrets braze-api")
            .count()
    };
    assert_eq!(refused(&api), 1, "{:?}", api.denied());
    assert_eq!(
        events(&api, "mirror")
            .iter()
            .filter(|(_, reason, _)| reason == "BrazeKeyNotHeld")
            .count(),
        1
    );

    api.delete_namespace(NS);
    namespace_gone(&api).await;
    let status = &last_state(&api)["status"];
    let running = condition(status, "Running");
    assert_eq!(running["reason"], "CleanupIncomplete", "{status}");
    assert_eq!(
        running["message"],
        "deleted without removing the flag: Secret marketing/braze-api not found (spec.braze.apiKeySecretRef)"
    );
    assert_eq!(w.braze.segment("looker_export", "LOOKER_EXPORT").len(), 40);
    assert_eq!(
        op.metric("braze_export_cleanups_total{result=\"CleanupIncomplete\"}"),
        Some(1.0)
    );
    op.stop().await;
}
