//! Self-tests of the fake apiserver (this crate): each of its knobs, as a real kube client and
//! kube-runtime watcher meet it, with the operator's own CRD.

use std::time::{Duration, Instant};

use braze_export_operator::spec::BrazeExport;
use fake_apiserver::{EXPORTS, FakeApiServer, LEASES};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::CustomResourceExt;
use kube::api::{
    Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::Status;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};

const NS: &str = "marketing";
const AV: &str = "looker-braze.dev/v1alpha1";

/// `FakeApiServer::start()`: the fake admitting BrazeExports by `BrazeExport::crd()`.
trait Start {
    fn start() -> impl Future<Output = FakeApiServer> + Send;
}

impl Start for FakeApiServer {
    fn start() -> impl Future<Output = FakeApiServer> + Send {
        FakeApiServer::start_with_crd(serde_json::to_value(BrazeExport::crd()).expect("crd"))
    }
}

fn export(name: &str) -> Value {
    json!({
        "apiVersion": AV,
        "kind": "BrazeExport",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "schedule": "0 6 * * *",
            "looker": {
                "baseUrl": "https://acme.cloud.looker.com",
                "lookId": "42",
                "credentialsSecretRef": {"name": "looker-api"}
            },
            "braze": {
                "endpoint": "https://rest.iad-01.braze.com",
                "apiKeySecretRef": {"name": "braze-api"}
            }
        }
    })
}

fn dynamic(client: kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client, NS, &ApiResource::erase::<BrazeExport>(&()))
}

fn typed(client: kube::Client) -> Api<BrazeExport> {
    Api::namespaced(client, NS)
}

async fn create(api: &FakeApiServer, object: Value) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(object).expect("object");
    dynamic(api.client())
        .create(&PostParams::default(), &object)
        .await
}

fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv_of(object: &Value) -> String {
    object["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .to_owned()
}

/// A run report as the status holds it; `completion` only for a finished run.
fn run(outcome: &str, completion: Option<&str>) -> Value {
    let mut r = json!({
        "startTime": "2026-01-01T06:00:00Z", "trigger": "Manual", "outcome": outcome,
        "message": "a run", "rowsRead": 10, "sent": 10, "failed": 0, "rejected": 0,
        "invalid": 0, "duplicates": 0, "skipped": 0, "requests": 1, "retries": 0,
        "rateLimited": 0, "errors": []
    });
    if let Some(c) = completion {
        r["completionTime"] = json!(c);
    }
    r
}

async fn until_init_done<S>(events: &mut S)
where
    S: futures_util::Stream<Item = watcher::Result<Event<BrazeExport>>> + Unpin,
{
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the watcher lists in time")
            .expect("the watcher goes on");
        if matches!(next, Ok(Event::InitDone)) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Preconditions

#[tokio::test]
async fn stale_resource_versions_and_foreign_uids_are_conflicts() {
    let api = FakeApiServer::start().await;
    let exports = dynamic(api.client());
    let created = create(&api, export("x")).await.unwrap();
    let first_rv = created.metadata.resource_version.clone().unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    // Someone else writes: the resourceVersion moves on.
    api.patch(
        EXPORTS,
        NS,
        "x",
        json!({"metadata": {"labels": {"team": "a"}}}),
    );
    let pp = PatchParams::default();

    let stale = json!({"metadata": {"resourceVersion": first_rv}, "spec": {"suspend": true}});
    let e = api_error(exports.patch("x", &pp, &Patch::Merge(&stale)).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Operation cannot be fulfilled on brazeexports.looker-braze.dev \"x\": the object has been modified; please apply your changes to the latest version and try again"
    );
    assert_eq!(api.get(EXPORTS, NS, "x").unwrap()["spec"]["suspend"], false);

    // The current resourceVersion passes; it is a precondition, not data.
    let current = rv_of(&api.get(EXPORTS, NS, "x").unwrap());
    let fresh =
        json!({"metadata": {"resourceVersion": current, "uid": uid}, "spec": {"suspend": true}});
    let patched = exports
        .patch("x", &pp, &Patch::Merge(&fresh))
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["suspend"], true);
    assert_ne!(patched.metadata.resource_version, Some(current));
    assert_eq!(patched.metadata.uid.as_deref(), Some(uid.as_str()));

    // A foreign uid on a status write.
    let foreign =
        json!({"metadata": {"uid": "someone-else"}, "status": {"lastHandledRunRequest": "r1"}});
    let e = api_error(
        exports
            .patch_status("x", &pp, &Patch::Merge(&foreign))
            .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains(&format!(
            "Precondition failed: UID in precondition: someone-else, UID in object meta: {uid}"
        )),
        "{}",
        e.message
    );
    assert!(api.get(EXPORTS, NS, "x").unwrap().get("status").is_none());

    // A stale resourceVersion on a server-side apply of the status.
    let apply = json!({"apiVersion": AV, "kind": "BrazeExport", "metadata": {"resourceVersion": first_rv}, "status": {"lastHandledRunRequest": "r1"}});
    let e = api_error(
        exports
            .patch_status(
                "x",
                &PatchParams::apply("op").force(),
                &Patch::Apply(&apply),
            )
            .await,
    );
    assert_eq!(e.code, 409);

    // PUT: a stale copy loses, the fresh one wins; a PUT without resourceVersion is refused.
    let fresh = exports.get("x").await.unwrap();
    let mut stale = fresh.clone();
    stale.metadata.resource_version = Some(first_rv.clone());
    let e = api_error(exports.replace("x", &PostParams::default(), &stale).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    let mut unversioned = fresh.clone();
    unversioned.metadata.resource_version = None;
    let e = api_error(
        exports
            .replace("x", &PostParams::default(), &unversioned)
            .await,
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            422,
            "BrazeExport.looker-braze.dev \"x\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
        )
    );
    exports
        .replace("x", &PostParams::default(), &fresh)
        .await
        .unwrap();

    // A namesake recreated: a write carrying the old uid lands nowhere.
    api.delete(EXPORTS, NS, "x");
    let again = create(&api, export("x")).await.unwrap();
    assert_ne!(again.metadata.uid.as_deref(), Some(uid.as_str()));
    let old_uid = json!({"metadata": {"uid": uid}, "status": {"lastHandledRunRequest": "late"}});
    let e = api_error(
        exports
            .patch_status("x", &pp, &Patch::Merge(&old_uid))
            .await,
    );
    assert_eq!(e.code, 409);
    assert!(api.get(EXPORTS, NS, "x").unwrap().get("status").is_none());
}

#[tokio::test]
async fn replacing_a_lease_is_a_compare_and_swap() {
    let api = FakeApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(api.client(), "default");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("lock".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let seen_by_a = leases.get("lock").await.unwrap();
    let seen_by_b = seen_by_a.clone();
    let mut a = seen_by_a;
    a.spec.as_mut().unwrap().holder_identity = Some("a-renewed".into());
    leases
        .replace("lock", &PostParams::default(), &a)
        .await
        .unwrap();
    let mut b = seen_by_b;
    b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let e = api_error(leases.replace("lock", &PostParams::default(), &b).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"lock\": the object has been modified; please apply your changes to the latest version and try again"
    );
    assert_eq!(
        api.get(LEASES, "default", "lock").unwrap()["spec"]["holderIdentity"],
        "a-renewed"
    );
}

// ---------------------------------------------------------------------------------------
// Server-side apply

#[tokio::test]
async fn server_side_apply_removes_what_its_manager_no_longer_sets() {
    let api = FakeApiServer::start().await;
    create(&api, export("x")).await.unwrap();
    let exports = dynamic(api.client());
    let operator = PatchParams::apply("braze-export-operator");
    let status = |s: Value| json!({"apiVersion": AV, "kind": "BrazeExport", "status": s});

    let finished = status(json!({
        "lastHandledRunRequest": "r1",
        "lastRun": run("Succeeded", Some("2026-01-01T06:01:00Z")),
        "history": [{"startTime": "2026-01-01T06:00:00Z", "trigger": "Manual", "outcome": "Succeeded", "sent": 10, "durationSeconds": 60.0}],
    }));
    exports
        .patch_status("x", &operator, &Patch::Apply(&finished))
        .await
        .unwrap();
    // Someone else's field.
    api.patch(
        EXPORTS,
        NS,
        "x",
        json!({"status": {"lastScheduleTime": "2026-01-01T06:00:00Z"}}),
    );

    // The next run: Running, without the old completionTime, and no history in this apply.
    let running = status(json!({"lastHandledRunRequest": "r2", "lastRun": run("Running", None)}));
    exports
        .patch_status("x", &operator, &Patch::Apply(&running))
        .await
        .unwrap();
    let s = api.get(EXPORTS, NS, "x").unwrap()["status"].clone();
    assert_eq!(s["lastRun"]["outcome"], "Running");
    assert!(
        s["lastRun"].get("completionTime").is_none(),
        "an omitted field is removed: {s}"
    );
    assert_eq!(
        s["history"],
        json!([]),
        "the omitted list is removed (then defaulted to [] by the schema)"
    );
    assert_eq!(
        s["lastScheduleTime"], "2026-01-01T06:00:00Z",
        "another manager's field stays"
    );

    // Lists are atomic: a shorter list replaces the longer one.
    let item = |sent: u64| json!({"startTime": "2026-01-01T06:00:00Z", "trigger": "Manual", "outcome": "Succeeded", "sent": sent, "durationSeconds": 1.0});
    for history in [json!([item(1), item(2)]), json!([item(3)])] {
        let body = status(json!({"lastHandledRunRequest": "r2", "history": history}));
        exports
            .patch_status("x", &operator, &Patch::Apply(&body))
            .await
            .unwrap();
    }
    assert_eq!(
        api.get(EXPORTS, NS, "x").unwrap()["status"]["history"],
        json!([item(3)])
    );

    // An apply to the main resource never touches status, and removes its omitted spec fields.
    let gitops = PatchParams::apply("gitops");
    let mut spec = export("x");
    spec["spec"]["maxRows"] = json!(100);
    exports
        .patch("x", &gitops, &Patch::Apply(&spec))
        .await
        .unwrap();
    assert_eq!(api.get(EXPORTS, NS, "x").unwrap()["spec"]["maxRows"], 100);
    let status_before = api.get(EXPORTS, NS, "x").unwrap()["status"].clone();
    let mut with_status = export("x");
    with_status["status"] = json!({"lastHandledRunRequest": "from-main"});
    exports
        .patch("x", &gitops, &Patch::Apply(&with_status))
        .await
        .unwrap();
    let after = api.get(EXPORTS, NS, "x").unwrap();
    assert!(after["spec"].get("maxRows").is_none(), "{after}");
    assert_eq!(after["status"], status_before);

    // An apply names its manager; force is for applies only.
    let req = |ct: &str, query: &str| {
        axum::http::Request::patch(format!("/apis/{AV}/namespaces/{NS}/brazeexports/x?{query}"))
            .header("content-type", ct)
            .body(export("x").to_string().into_bytes())
            .unwrap()
    };
    let client = api.client();
    let e = api_error(
        client
            .request::<DynamicObject>(req("application/apply-patch+yaml", ""))
            .await,
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            422,
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
        )
    );
    let e = api_error(
        client
            .request::<DynamicObject>(req("application/merge-patch+json", "force=true"))
            .await,
    );
    assert_eq!(e.code, 422);

    // Conflicts with another manager stay, unless forced.
    let mut other = export("x");
    other["spec"]["schedule"] = json!("0 7 * * *");
    let e = api_error(
        exports
            .patch("x", &PatchParams::apply("someone"), &Patch::Apply(&other))
            .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Apply failed with 1 conflict: conflict with \"gitops\": .spec.schedule"
    );
    exports
        .patch(
            "x",
            &PatchParams::apply("someone").force(),
            &Patch::Apply(&other),
        )
        .await
        .unwrap();
    assert_eq!(
        api.managed_fields(EXPORTS, NS, "x")["/spec/schedule"],
        "someone (Apply)"
    );

    // Merge patches keep RFC 7386: absent fields stay.
    exports
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    assert_eq!(
        api.get(EXPORTS, NS, "x").unwrap()["spec"]["schedule"],
        "0 7 * * *"
    );
}

// ---------------------------------------------------------------------------------------
// Watch lag and 410 Gone

#[tokio::test]
async fn a_lagging_watch_delivers_late_while_reads_are_current() {
    let api = FakeApiServer::start().await;
    api.put(EXPORTS, export("x"));
    let lag = Duration::from_millis(1500);
    api.set_watch_lag(lag);
    let exports = typed(api.client());
    let mut events = watcher::watcher(exports.clone(), watcher::Config::default()).boxed();
    until_init_done(&mut events).await;

    let written = Instant::now();
    for size in [11, 12, 13] {
        exports
            .patch(
                "x",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"braze": {"batchSize": size}}})),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        exports.get("x").await.unwrap().spec.braze.batch_size,
        13,
        "a GET is current"
    );
    assert_eq!(
        exports.list(&Default::default()).await.unwrap().items[0]
            .spec
            .braze
            .batch_size,
        13,
        "a list is current"
    );
    assert!(
        tokio::time::timeout(lag - Duration::from_millis(400), events.next())
            .await
            .is_err(),
        "nothing reaches the watcher before the lag"
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("the events come")
            .unwrap()
            .unwrap();
        if let Event::Apply(o) = event {
            if seen.is_empty() {
                assert!(
                    written.elapsed() >= lag - Duration::from_millis(100),
                    "the first event came {:?} after the write",
                    written.elapsed()
                );
            }
            seen.push(o.spec.braze.batch_size);
        }
    }
    assert_eq!(seen, [11, 12, 13], "in order");
}

#[tokio::test]
async fn expired_watches_make_the_watcher_relist_and_go_on() {
    let api = FakeApiServer::start().await;
    api.put(EXPORTS, export("x"));
    api.patch(
        EXPORTS,
        NS,
        "x",
        json!({"metadata": {"labels": {"a": "b"}}}),
    );
    let exports = typed(api.client());
    let mut events = watcher::watcher(exports.clone(), watcher::Config::default()).boxed();
    until_init_done(&mut events).await;
    assert_eq!(api.list_count(EXPORTS), 1);
    // Its watch is open once a change has come through it.
    api.patch(
        EXPORTS,
        NS,
        "x",
        json!({"metadata": {"labels": {"a": "c"}}}),
    );
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("the change comes")
            .unwrap()
            .unwrap();
        if matches!(next, Event::Apply(_)) {
            break;
        }
    }

    let expired_at = rv_of(&api.get(EXPORTS, NS, "x").unwrap());
    api.expire_watches();
    let mut gone = None;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the watcher reacts")
            .expect("and goes on");
        match next {
            Err(watcher::Error::WatchError(status)) => gone = Some(status),
            Ok(Event::InitDone) => break,
            _ => {}
        }
    }
    let gone = gone.expect("the watcher saw 410 Gone");
    assert_eq!(
        (gone.code, gone.reason.as_str()),
        (410, "Expired"),
        "{gone:?}"
    );
    assert!(gone.message.starts_with("too old resource version: "));
    assert_eq!(api.list_count(EXPORTS), 2, "the watcher relisted");

    // Later changes still reach it.
    api.patch(EXPORTS, NS, "x", json!({"spec": {"suspend": true}}));
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("the change comes")
            .unwrap()
            .unwrap();
        if let Event::Apply(o) = next
            && o.spec.suspend
        {
            break;
        }
    }

    // A watch from before the expiry point is told so at once.
    let mut old = exports
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match old.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!("too old resource version: 1 ({expired_at})")
            );
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    assert!(
        old.try_next().await.unwrap().is_none(),
        "and the watch ends"
    );
    // One from the expiry point on is fine.
    let mut fine = exports
        .watch(&WatchParams::default(), &expired_at)
        .await
        .unwrap()
        .boxed();
    match fine.try_next().await.unwrap() {
        Some(WatchEvent::Modified(o)) => assert!(o.spec.suspend),
        other => panic!("expected the change, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Schema admission

#[tokio::test]
async fn exports_are_pruned_and_defaulted_like_the_apiserver_does() {
    let api = FakeApiServer::start().await;
    let mut o = export("x");
    o["spec"]["braze"]["futureField"] = json!(1);
    o["spec"]["unknownTop"] = json!({"a": 1});
    o["spec"]["suspend"] = Value::Null;
    o["status"] = json!({"lastHandledRunRequest": "a create never sets status"});
    create(&api, o).await.expect("pruning is silent");
    let stored = api.get(EXPORTS, NS, "x").unwrap();
    assert!(stored["spec"]["braze"].get("futureField").is_none());
    assert!(stored["spec"].get("unknownTop").is_none());
    assert!(stored.get("status").is_none());
    let spec = &stored["spec"];
    assert_eq!(spec["suspend"], false, "a null is defaulted");
    assert_eq!(
        spec["braze"],
        json!({
            "endpoint": "https://rest.iad-01.braze.com",
            "apiKeySecretRef": {"name": "braze-api", "key": "api_key"},
            "attribute": "looker_export",
            "batchSize": 75,
            "concurrency": 512,
            "delta": false,
            "exportName": "LOOKER_EXPORT",
            "fullResyncInterval": "168h",
            "identifier": "external_id",
            "removal": "Keep",
            "removalLimitPercent": 20,
            "updateExistingOnly": true,
        })
    );
    assert_eq!(spec["looker"]["results"], "Table");
    assert_eq!(spec["looker"]["verifyTls"], true);
    assert_eq!(spec["looker"]["timeoutSeconds"], 300);
    assert_eq!(
        spec["looker"]["credentialsSecretRef"],
        json!({"name": "looker-api", "clientIdKey": "client_id", "clientSecretKey": "client_secret"})
    );
    typed(api.client())
        .get("x")
        .await
        .expect("the operator decodes it");

    // Status writes are defaulted and pruned too.
    dynamic(api.client())
        .patch_status(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"lastHandledRunRequest": "r", "bogus": 1}})),
        )
        .await
        .unwrap();
    let status = api.get(EXPORTS, NS, "x").unwrap()["status"].clone();
    assert_eq!(
        status,
        json!({"lastHandledRunRequest": "r", "conditions": [], "history": []})
    );

    // The test-side helpers are admitted as well.
    let mut y = export("y");
    y["spec"]["extra"] = json!(true);
    let stored = api.put(EXPORTS, y);
    assert!(stored["spec"].get("extra").is_none());
    assert_eq!(stored["spec"]["braze"]["batchSize"], 75);
    let patched = api.patch(EXPORTS, NS, "y", json!({"spec": {"braze": {"more": 1}}}));
    assert!(patched["spec"]["braze"].get("more").is_none());
}

#[tokio::test]
async fn invalid_exports_are_refused_in_the_apiservers_words() {
    let api = FakeApiServer::start().await;
    let prefix = |name: &str| format!("BrazeExport.looker-braze.dev \"{name}\" is invalid: ");
    type Case = (&'static str, fn(&mut Value), &'static str);
    let cases: Vec<Case> = vec![
        (
            "batch",
            |o| o["spec"]["braze"]["batchSize"] = json!(80),
            "spec.braze.batchSize: Invalid value: 80: spec.braze.batchSize in body should be less than or equal to 75",
        ),
        (
            "enum",
            |o| o["spec"]["braze"]["identifier"] = json!("email"),
            "spec.braze.identifier: Unsupported value: \"email\": supported values: \"external_id\", \"braze_id\", \"user_alias\"",
        ),
        (
            "required",
            |o| {
                o["spec"]["braze"]
                    .as_object_mut()
                    .unwrap()
                    .remove("endpoint");
            },
            "spec.braze.endpoint: Required value",
        ),
        (
            "type",
            |o| o["spec"]["braze"]["batchSize"] = json!("ten"),
            "spec.braze.batchSize: Invalid value: \"string\": spec.braze.batchSize in body must be of type integer: \"string\"",
        ),
        (
            "short",
            |o| o["spec"]["schedule"] = json!(""),
            "spec.schedule: Invalid value: \"\": spec.schedule in body should be at least 1 chars long",
        ),
        (
            "long",
            |o| o["spec"]["braze"]["exportName"] = json!("x".repeat(256)),
            "spec.braze.exportName: Too long: may not be more than 255 bytes",
        ),
        (
            "minimum",
            |o| o["spec"]["braze"]["concurrency"] = json!(0),
            "spec.braze.concurrency: Invalid value: 0: spec.braze.concurrency in body should be greater than or equal to 1",
        ),
        (
            "no-spec",
            |o| {
                o.as_object_mut().unwrap().remove("spec");
            },
            "spec: Required value",
        ),
    ];
    for (name, break_it, want) in cases {
        let mut o = export(name);
        break_it(&mut o);
        let e = api_error(create(&api, o.clone()).await);
        assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{name}");
        assert_eq!(e.message, format!("{}{want}", prefix(name)), "{name}");
        let cause = &e.details.as_ref().expect("details").causes[0];
        assert_eq!(
            cause.field,
            want.split(':').next().unwrap(),
            "{name}: the cause names the field"
        );
        let refused = api.try_put(EXPORTS, o).unwrap_err();
        assert_eq!(refused.message, e.message, "{name}: the helper agrees");
        assert!(
            api.get(EXPORTS, NS, name).is_none(),
            "{name}: nothing stored"
        );
    }

    // Every violation is listed.
    let mut o = export("many");
    o["spec"]["braze"]["batchSize"] = json!(80);
    o["spec"]["looker"]["results"] = json!("Some");
    o["spec"]["looker"]
        .as_object_mut()
        .unwrap()
        .remove("lookId");
    let e = api_error(create(&api, o).await);
    assert_eq!(
        e.message,
        format!(
            "{}[spec.braze.batchSize: Invalid value: 80: spec.braze.batchSize in body should be less than or equal to 75, spec.looker.lookId: Required value, spec.looker.results: Unsupported value: \"Some\": supported values: \"Table\", \"All\"]",
            prefix("many")
        )
    );
    assert_eq!(e.details.unwrap().causes.len(), 3);

    // A status write validates only the status...
    create(&api, export("x")).await.unwrap();
    let exports = dynamic(api.client());
    let bad_history = json!({"status": {"history": [{"outcome": "Fine", "sent": -1}]}});
    let e = api_error(
        exports
            .patch_status("x", &PatchParams::default(), &Patch::Merge(&bad_history))
            .await,
    );
    assert_eq!(e.code, 422);
    for part in [
        "status.history[0].durationSeconds: Required value",
        "status.history[0].startTime: Required value",
        "status.history[0].outcome: Unsupported value: \"Fine\"",
        "status.history[0].sent: Invalid value: -1: status.history[0].sent in body should be greater than or equal to 0",
    ] {
        assert!(e.message.contains(part), "{part} in {}", e.message);
    }
    // ...and a main-resource write ignores it.
    exports
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"metadata": {"labels": {"a": "b"}}, "status": {"history": "not a list"}}),
            ),
        )
        .await
        .unwrap();
    assert!(api.get(EXPORTS, NS, "x").unwrap().get("status").is_none());

    // A list keyed by type (as a newer CRD may declare `conditions`) refuses duplicate keys.
    let mut crd = serde_json::to_value(BrazeExport::crd()).unwrap();
    let conditions = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"]["conditions"];
    conditions["x-kubernetes-list-type"] = json!("map");
    conditions["x-kubernetes-list-map-keys"] = json!(["type"]);
    api.set_crd(crd);
    let condition = |type_: &str| json!({"type": type_, "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T06:00:00Z"});
    let twice = json!({"status": {"conditions": [condition("Ready"), condition("Running"), condition("Ready")]}});
    let e = api_error(
        exports
            .patch_status("x", &PatchParams::default(), &Patch::Merge(&twice))
            .await,
    );
    assert_eq!(
        e.message,
        format!(
            "{}status.conditions[2]: Duplicate value: map[string]interface {{}}{{\"type\":\"Ready\"}}",
            prefix("x")
        )
    );

    // Custom resources take no strategic merge patch.
    let e = api_error(
        exports
            .patch(
                "x",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"suspend": true}})),
            )
            .await,
    );
    assert_eq!(e.code, 415);
    // Nor a JSON patch, which this fake does not take (nor does the operator send one).
    let ops = json!([{"op": "replace", "path": "/spec/suspend", "value": true}]);
    let json_patch =
        axum::http::Request::patch(format!("/apis/{AV}/namespaces/{NS}/brazeexports/x"))
            .header("content-type", "application/json-patch+json")
            .body(ops.to_string().into_bytes())
            .unwrap();
    let e = api_error(api.client().request::<DynamicObject>(json_patch).await);
    assert_eq!((e.code, e.reason.as_str()), (415, "UnsupportedMediaType"));
    assert_eq!(api.get(EXPORTS, NS, "x").unwrap()["spec"]["suspend"], false);
}

#[tokio::test]
async fn a_newer_crd_admits_what_an_older_operator_cannot_read_and_old_values_ratchet() {
    let api = FakeApiServer::start().await;
    let mut crd = serde_json::to_value(BrazeExport::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["braze"]
        ["properties"]["priority"] =
        json!({"type": "integer", "minimum": 1, "maximum": 10, "default": 5});
    api.set_crd(crd);
    create(&api, export("newer")).await.unwrap();
    assert_eq!(
        api.get(EXPORTS, NS, "newer").unwrap()["spec"]["braze"]["priority"],
        5,
        "the newer CRD's default"
    );
    let mut o = export("too-high");
    o["spec"]["braze"]["priority"] = json!(11);
    assert_eq!(api_error(create(&api, o).await).code, 422);
    let err = typed(api.client()).get("newer").await.unwrap_err();
    assert!(
        err.to_string().contains("priority"),
        "this operator cannot decode it: {err}"
    );

    // Stored by some other version, without admission.
    let api = FakeApiServer::start().await;
    let mut legacy = export("legacy");
    legacy["spec"]["braze"]["batchSize"] = json!(500);
    api.put_unchecked(EXPORTS, legacy);
    let stored = api.get(EXPORTS, NS, "legacy").unwrap();
    assert_eq!(stored["spec"]["braze"]["batchSize"], 500);
    assert!(
        stored["spec"]["braze"].get("identifier").is_none(),
        "not defaulted"
    );
    let exports = dynamic(api.client());
    // An unchanged invalid value does not block other writes (ratcheting)...
    exports
        .patch(
            "legacy",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "1"}}})),
        )
        .await
        .unwrap();
    exports
        .patch_status(
            "legacy",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"lastHandledRunRequest": "1"}})),
        )
        .await
        .unwrap();
    // ...but a new invalid value does.
    let e = api_error(
        exports
            .patch(
                "legacy",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"braze": {"batchSize": 600}}})),
            )
            .await,
    );
    assert!(
        e.message
            .ends_with("spec.braze.batchSize: Invalid value: 600: spec.braze.batchSize in body should be less than or equal to 75"),
        "{}",
        e.message
    );
}

// ---------------------------------------------------------------------------------------
// CEL rules

/// Every `x-kubernetes-validations` rule in a schema, with the path of its node.
fn rules(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    for r in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push((path.to_owned(), r["message"].as_str().unwrap().to_owned()));
    }
    for (k, s) in schema["properties"].as_object().into_iter().flatten() {
        rules(s, format!("{path}.{k}").trim_start_matches('.'), out);
    }
    if let Some(items) = schema.get("items") {
        rules(items, &format!("{path}[]"), out);
    }
}

#[tokio::test]
async fn the_crds_cel_rules_are_evaluated() {
    let api = FakeApiServer::start().await;
    let crd = serde_json::to_value(BrazeExport::crd()).unwrap();
    let mut found = Vec::new();
    rules(
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        "",
        &mut found,
    );
    let https = "must use https (plain http only for loopback addresses)";
    assert_eq!(
        found,
        [
            (
                "spec".to_owned(),
                "cleanupOnDelete needs braze.removal: Remove".to_owned()
            ),
            (
                "spec.braze".to_owned(),
                "aliasLabel is required when identifier is user_alias".to_owned()
            ),
            (
                "spec.braze.endpoint".to_owned(),
                format!("endpoint {https}")
            ),
            ("spec.looker.baseUrl".to_owned(), format!("baseUrl {https}")),
        ],
        "each rule of the CRD is tested below"
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut o = export("x");
        f(&mut o);
        o
    };
    let admitted = |o: Value| api.admit(o).map(|_| ()).map_err(|r| r.message);
    let refused = |field: &str, type_: &str, message: &str| {
        Err(format!(
            "BrazeExport.looker-braze.dev \"x\" is invalid: {field}: Invalid value: \"{type_}\": {message}"
        ))
    };

    for url in [
        "https://acme.cloud.looker.com",
        "http://127.0.0.1:9999",
        "http://localhost",
        "http://localhost:8080/api",
        "http://[::1]:8080",
    ] {
        let o = with(&|o| o["spec"]["looker"]["baseUrl"] = json!(url));
        assert_eq!(admitted(o), Ok(()), "baseUrl {url}");
        let o = with(&|o| o["spec"]["braze"]["endpoint"] = json!(url));
        assert_eq!(admitted(o), Ok(()), "endpoint {url}");
    }
    for url in [
        "http://acme.cloud.looker.com",
        "http://localhost.evil.example",
        "ftp://127.0.0.1",
    ] {
        let o = with(&|o| o["spec"]["looker"]["baseUrl"] = json!(url));
        assert_eq!(
            admitted(o),
            refused("spec.looker.baseUrl", "string", &format!("baseUrl {https}")),
            "baseUrl {url}"
        );
        let o = with(&|o| o["spec"]["braze"]["endpoint"] = json!(url));
        assert_eq!(
            admitted(o),
            refused(
                "spec.braze.endpoint",
                "string",
                &format!("endpoint {https}")
            ),
            "endpoint {url}"
        );
    }
    let o = with(&|o| o["spec"]["braze"]["endpoint"] = json!(" https://rest.iad-01.braze.com"));
    assert_eq!(admitted(o), Ok(()), "the endpoint rule trims");

    let alias = |label: Option<&str>, identifier: &str| {
        with(&|o| {
            o["spec"]["braze"]["identifier"] = json!(identifier);
            if let Some(l) = label {
                o["spec"]["braze"]["aliasLabel"] = json!(l);
            }
        })
    };
    let needs_label = refused(
        "spec.braze",
        "object",
        "aliasLabel is required when identifier is user_alias",
    );
    assert_eq!(admitted(alias(None, "user_alias")), needs_label);
    assert_eq!(admitted(alias(Some(""), "user_alias")), needs_label);
    assert_eq!(admitted(alias(Some("crm"), "user_alias")), Ok(()));
    assert_eq!(admitted(alias(None, "external_id")), Ok(()));
    assert_eq!(admitted(alias(None, "braze_id")), Ok(()));

    let cleanup = |removal: Option<&str>, on: bool| {
        with(&|o| {
            o["spec"]["cleanupOnDelete"] = json!(on);
            if let Some(r) = removal {
                o["spec"]["braze"]["removal"] = json!(r);
            }
        })
    };
    let needs_remove = refused(
        "spec",
        "object",
        "cleanupOnDelete needs braze.removal: Remove",
    );
    assert_eq!(
        admitted(cleanup(None, true)),
        needs_remove,
        "Keep by default"
    );
    assert_eq!(admitted(cleanup(Some("Keep"), true)), needs_remove);
    assert_eq!(admitted(cleanup(Some("Remove"), true)), Ok(()));
    assert_eq!(admitted(cleanup(None, false)), Ok(()));

    // Through a client too.
    let e = api_error(create(&api, alias(None, "user_alias")).await);
    assert_eq!(Err(e.message), needs_label);
    assert_eq!(e.code, 422);

    // The rules are evaluated, not recognised: a rule of a CRD set here works as well.
    let mut crd = crd;
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["braze"]["x-kubernetes-validations"]
        .as_array_mut()
        .unwrap()
        .push(json!({"rule": "self.batchSize <= self.concurrency", "message": "batchSize must not exceed concurrency"}));
    api.set_crd(crd);
    let o = with(&|o| {
        o["spec"]["braze"]["batchSize"] = json!(50);
        o["spec"]["braze"]["concurrency"] = json!(10);
    });
    assert_eq!(
        admitted(o),
        refused(
            "spec.braze",
            "object",
            "batchSize must not exceed concurrency"
        )
    );
    let o = with(&|o| o["spec"]["braze"]["concurrency"] = json!(10));
    assert_eq!(
        admitted(o),
        refused(
            "spec.braze",
            "object",
            "batchSize must not exceed concurrency"
        ),
        "the default batchSize (75) counts"
    );
    let o = with(&|o| o["spec"]["braze"]["batchSize"] = json!(5));
    assert_eq!(admitted(o), Ok(()));
}

// ---------------------------------------------------------------------------------------
// Partition

#[tokio::test]
async fn a_partitioned_client_hangs_while_others_work_and_recovers_after_heal() {
    let api = FakeApiServer::start().await;
    api.put(EXPORTS, export("x"));
    let (far_client, partition) = api.partitionable_client();
    let far = typed(far_client);
    let near = typed(api.client());
    let seen = far.get("x").await.unwrap();
    let rv = seen.metadata.resource_version.clone().unwrap();
    let mut watch = far
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();

    partition.cut();
    assert!(partition.is_cut());
    assert!(
        tokio::time::timeout(Duration::from_secs(1), far.get("x"))
            .await
            .is_err(),
        "a request gets no answer"
    );
    near.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await
    .expect("another client works");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), watch.next())
            .await
            .is_err(),
        "the open watch is silent"
    );

    partition.heal();
    let after = tokio::time::timeout(Duration::from_secs(5), far.get("x"))
        .await
        .expect("answered after heal")
        .unwrap();
    assert!(after.spec.suspend);
    match tokio::time::timeout(Duration::from_secs(5), watch.try_next()).await {
        Ok(Ok(Some(WatchEvent::Modified(o)))) => assert!(o.spec.suspend),
        other => panic!("the held event flows after heal: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// What writes carried

#[tokio::test]
async fn the_server_records_what_each_write_carried() {
    let api = FakeApiServer::start().await;
    let created = create(&api, export("x")).await.unwrap();
    let uid = created.metadata.uid.unwrap();
    let body = json!({"apiVersion": AV, "kind": "BrazeExport", "metadata": {"uid": uid}, "status": {"lastHandledRunRequest": "r1"}});
    dynamic(api.client())
        .patch_status(
            "x",
            &PatchParams::apply("braze-export-operator").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    let w = api.writes().pop().unwrap();
    assert_eq!(
        (w.method.as_str(), w.namespace.as_str(), w.name.as_str()),
        ("PATCH", NS, "x")
    );
    assert!(w.status);
    assert!(w.force);
    assert_eq!(w.field_manager.as_deref(), Some("braze-export-operator"));
    assert_eq!(w.content_type, "application/apply-patch+yaml");
    assert!(w.query.contains("fieldManager=braze-export-operator"));
    assert_eq!(api.last_body(EXPORTS, "x"), Some(body));
    assert!(api.requests().iter().any(|r| r.starts_with(
        "PATCH /apis/looker-braze.dev/v1alpha1/namespaces/marketing/brazeexports/x/status?"
    ) && r.contains("fieldManager=braze-export-operator")));
    assert_eq!(
        api.managed_fields(EXPORTS, NS, "x")["/status/lastHandledRunRequest"],
        "braze-export-operator (Apply)"
    );
}

/// An events.k8s.io Event whose note is over 1 KiB (bytes, not characters) is refused as the
/// apiserver's validation words it, on create and on the series patch kube's recorder sends.
#[tokio::test]
async fn event_notes_over_1024_bytes_are_invalid() {
    use k8s_openapi::api::events::v1::Event as KubeEvent;
    let api = FakeApiServer::start().await;
    let events: Api<KubeEvent> = Api::namespaced(api.client(), NS);
    let event = |name: &str, note: String| KubeEvent {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            jiff::Timestamp::now(),
        )),
        note: Some(note),
        reason: Some("Test".into()),
        ..KubeEvent::default()
    };
    // 1,024 bytes in 512 characters: taken; one character more is 1,026 bytes.
    let fits = events
        .create(&PostParams::default(), &event("fits", "é".repeat(512)))
        .await
        .unwrap();
    assert_eq!(fits.note.as_deref().map(str::len), Some(1024));
    let s = api_error(
        events
            .create(&PostParams::default(), &event("long", "é".repeat(513)))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        "Event.events.k8s.io \"long\" is invalid: note: Too long: may not be more than 1024 bytes"
    );
    let s = api_error(
        events
            .patch(
                "fits",
                &PatchParams::default(),
                &Patch::Merge(json!({"note": "x".repeat(1025)})),
            )
            .await,
    );
    assert_eq!(s.code, 422);
    assert!(api.get(fake_apiserver::EVENTS, NS, "long").is_none());
}

/// `refuse_status_writes`: one export's status writes get 403 or 422 (recorded), its main
/// resource and other exports' status are still written; lifted, they land again.
#[tokio::test]
async fn status_writes_of_one_export_can_be_refused() {
    let api = FakeApiServer::start().await;
    let uid = create(&api, export("x"))
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    create(&api, export("y")).await.unwrap();
    let status = |uid: Option<&str>, r: &str| {
        let mut meta = json!({});
        if let Some(u) = uid {
            meta["uid"] = json!(u);
        }
        Patch::Apply(
            json!({"apiVersion": AV, "kind": "BrazeExport", "metadata": meta, "status": {"lastHandledRunRequest": r}}),
        )
    };
    let params = PatchParams::apply("braze-export-operator").force();
    let exports = dynamic(api.client());
    api.refuse_status_writes(NS, "x", 403);
    let s = api_error(
        exports
            .patch_status("x", &params, &status(Some(&uid), "r1"))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert!(
        s.message
            .starts_with("brazeexports.looker-braze.dev \"x\" is forbidden: User ")
    );
    assert!(
        s.message
            .contains("cannot patch resource \"brazeexports/status\"")
    );
    assert!(
        api.writes().last().unwrap().status,
        "the refused write is recorded"
    );
    exports
        .patch_status("y", &params, &status(None, "r1"))
        .await
        .unwrap();
    exports
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap();
    api.refuse_status_writes(NS, "x", 422);
    let s = api_error(
        exports
            .patch_status("x", &params, &status(Some(&uid), "r1"))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(
        s.message
            .starts_with("BrazeExport.looker-braze.dev \"x\" is invalid: status: ")
    );
    assert!(api.get(EXPORTS, NS, "x").unwrap().get("status").is_none());
    api.accept_status_writes(NS, "x");
    exports
        .patch_status("x", &params, &status(Some(&uid), "r2"))
        .await
        .unwrap();
    assert_eq!(
        api.get(EXPORTS, NS, "x").unwrap()["status"]["lastHandledRunRequest"],
        "r2"
    );
}

#[tokio::test]
async fn a_metadata_list_answers_metadata_alone_and_is_recorded_so() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::ListParams;
    let server = FakeApiServer::start().await;
    server.put_secret(NS, "a", &[("part", "secret bytes")]);
    server.put_secret(NS, "b", &[("part", "more secret bytes")]);
    let api: Api<Secret> = Api::namespaced(server.client(), NS);

    let listed = api.list_metadata(&ListParams::default()).await.unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(
        listed
            .items
            .iter()
            .all(|s| s.metadata.resource_version.is_some())
    );
    let requests = server.requests();
    assert!(
        requests.last().unwrap().ends_with(" (metadata)"),
        "{requests:?}"
    );

    // The answer itself: a PartialObjectMetadataList with no data in it.
    let request = axum::http::Request::get("/api/v1/namespaces/marketing/secrets")
        .header(
            "Accept",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .body(Vec::new())
        .unwrap();
    let raw: Value =
        serde_json::from_str(&server.client().request_text(request).await.unwrap()).unwrap();
    assert_eq!(raw["kind"], "PartialObjectMetadataList");
    assert_eq!(raw["apiVersion"], "meta.k8s.io/v1");
    let items = raw["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        assert_eq!(item["kind"], "PartialObjectMetadata");
        assert!(item.get("data").is_none(), "{item}");
        assert!(item["metadata"]["name"].is_string(), "{item}");
    }

    // A full list is recorded without the marker, and carries the data.
    let full = api.list(&ListParams::default()).await.unwrap();
    assert!(full.items.iter().all(|s| s.data.is_some()));
    let last = server.requests().last().cloned().unwrap();
    assert!(
        last.starts_with("GET /api/v1/namespaces/marketing/secrets"),
        "{last}"
    );
    assert!(!last.ends_with(" (metadata)"), "{last}");
}

// ---------------------------------------------------------------------------------------
// Namespace deletion

/// A namespace's deletion as the namespace controller does it: `Terminating` at once, creates
/// in it refused (403 in the NamespaceLifecycle plugin's words) while reads and writes of what
/// is there go on, every object of every kind deleted at once (those with finalizers stay
/// until they are removed, whatever they own or are owned by), the namespace gone once empty.
#[tokio::test]
async fn a_namespace_deletion_terminates_deletes_everything_at_once_and_ends_when_empty() {
    use fake_apiserver::{NAMESPACES, SECRETS};
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    let api = FakeApiServer::start().await;
    let namespaces: Api<Namespace> = Api::all(api.client());
    let created = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        created.status.and_then(|s| s.phase).as_deref(),
        Some("Active")
    );
    let x = create(&api, export("x")).await.unwrap();
    dynamic(api.client())
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["looker-braze.dev/cleanup"]}})),
        )
        .await
        .unwrap();
    create(&api, export("y")).await.unwrap();
    api.put_secret(NS, "held", &[("api_key", "k")]);
    api.patch(
        SECRETS,
        NS,
        "held",
        json!({"metadata": {"finalizers": ["looker-braze.dev/cleanup"]}}),
    );
    api.put_secret(NS, "plain", &[("a", "b")]);
    // Owned by the held export: deleted at once all the same (no foreground wait).
    api.put(
        SECRETS,
        json!({"metadata": {"name": "owned", "namespace": NS, "ownerReferences": [{"apiVersion": AV, "kind": "BrazeExport", "name": "x", "uid": x.metadata.uid.clone().unwrap()}]}}),
    );
    api.put_secret("other", "elsewhere", &[("a", "b")]);

    namespaces
        .delete(NS, &kube::api::DeleteParams::default())
        .await
        .unwrap();
    let ns = namespaces.get(NS).await.unwrap();
    assert!(ns.metadata.deletion_timestamp.is_some());
    assert_eq!(
        ns.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
    let gone: Vec<String> = api
        .removed()
        .into_iter()
        .map(|(r, o)| format!("{r} {}", o["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        gone,
        [
            "looker-braze.dev/v1alpha1/brazeexports y",
            "v1/secrets owned",
            "v1/secrets plain"
        ]
    );
    for (resource, name) in [(EXPORTS, "x"), (SECRETS, "held")] {
        let o = api.get(resource, NS, name).expect("held by its finalizer");
        assert!(o["metadata"]["deletionTimestamp"].is_string(), "{o}");
    }
    assert!(api.get(SECRETS, "other", "elsewhere").is_some());

    // Nothing new, of any kind; a create elsewhere is fine.
    let secrets: Api<Secret> = Api::namespaced(api.client(), NS);
    let refused = api_error(
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "new"}})).unwrap(),
            )
            .await,
    );
    assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        refused.message,
        "secrets \"new\" is forbidden: unable to create new content in namespace marketing because it is being terminated"
    );
    let refused = api_error(create(&api, export("z")).await);
    assert_eq!(
        refused.message,
        "brazeexports.looker-braze.dev \"z\" is forbidden: unable to create new content in namespace marketing because it is being terminated"
    );
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": NS}, "eventTime": "2026-01-01T06:00:00.000000Z", "reportingController": "c", "reportingInstance": "i", "action": "Reconcile", "reason": "CleanedUp", "type": "Normal", "regarding": {"kind": "BrazeExport", "name": "x", "namespace": NS}});
    let refused = api.try_put(fake_apiserver::EVENTS, event).unwrap_err();
    assert_eq!(refused.code, 403);
    assert!(
        refused
            .message
            .starts_with("events.events.k8s.io \"e\" is forbidden: unable to create new content in namespace marketing")
    );
    api.put_secret("other", "new", &[("a", "b")]);

    // What is there is still read and written: the status of a terminating export too.
    let uid = x.metadata.uid.clone().unwrap();
    dynamic(api.client())
        .patch_status(
            "x",
            &PatchParams::apply("braze-export-operator").force(),
            &Patch::Apply(json!({"apiVersion": AV, "kind": "BrazeExport", "metadata": {"uid": uid}, "status": {"lastHandledRunRequest": "r9"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        api.get(EXPORTS, NS, "x").unwrap()["status"]["lastHandledRunRequest"],
        "r9"
    );
    assert!(secrets.get("held").await.unwrap().data.is_some());

    // The last finalizers go: so do their objects, then the namespace.
    api.patch(
        SECRETS,
        NS,
        "held",
        json!({"metadata": {"finalizers": null}}),
    );
    assert!(api.get(NAMESPACES, "", NS).is_some(), "x is still there");
    dynamic(api.client())
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(api.get(EXPORTS, NS, "x").is_none());
    assert!(
        api.get(NAMESPACES, "", NS).is_none(),
        "the namespace is gone"
    );
    assert!(matches!(namespaces.get_opt(NS).await, Ok(None)));
    let last: Vec<String> = api
        .removed()
        .into_iter()
        .skip(3)
        .map(|(r, o)| format!("{r} {}", o["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        last,
        [
            "v1/secrets held",
            "looker-braze.dev/v1alpha1/brazeexports x",
            "v1/namespaces marketing"
        ]
    );

    // A namespace never created is there until deleted; its deletion works the same.
    api.put_secret("plain-ns", "s", &[("a", "b")]);
    api.delete_namespace("plain-ns");
    assert!(api.get(SECRETS, "plain-ns", "s").is_none());
    assert!(api.get(NAMESPACES, "", "plain-ns").is_none());
}
