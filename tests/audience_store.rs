//! The stored audience in Secrets (`audience_store`) against the project's fake API server:
//! parts under the Secret limit owned by the export, a manifest written last, old generations
//! deleted, and a crashed save that never mixes generations.

#[path = "support/fake.rs"]
mod fake;

use braze_export_operator::audience::{
    self, Audience, Encoded, Header, Member, MemberState, Owner,
};
use braze_export_operator::controller::audience_store::{
    Fence, OWNER_LABEL, StoreError, delete_audience, discard_audience, load_audience,
    manifest_name, save_audience,
};
use braze_export_operator::spec::{BrazeExport, IdentifierKind};
use fake::Start as _;
use fake_apiserver::{self as apiserver, FakeApiServer, SECRETS};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NS: &str = "marketing";

fn export(name: &str, uid: &str) -> BrazeExport {
    let yaml = r#"
schedule: "0 6 * * *"
looker: {baseUrl: "https://x.looker.com", lookId: "1", credentialsSecretRef: {name: l}}
braze: {endpoint: "https://rest.iad-01.braze.com", apiKeySecretRef: {name: b}, removal: Remove}
"#;
    let mut e = BrazeExport::new(name, serde_saphyr::from_str(yaml).unwrap());
    e.metadata.namespace = Some(NS.into());
    e.metadata.uid = Some(uid.into());
    e
}

/// An audience of `n` users whose identifiers compress badly (so that it takes parts).
fn audience(n: usize, seed: u64) -> Encoded {
    let mut rng = fastrand::Rng::with_seed(seed);
    let a = Audience {
        header: Header {
            export: Owner {
                namespace: Some(NS.into()),
                name: "churn-risk".into(),
            },
            identifier: IdentifierKind::ExternalId,
            alias_label: None,
            attribute: "looker_export".into(),
            export_name: "CHURN_RISK".into(),
            last_full_resync: None,
            members: 0,
            workspace: None,
            stray_flags: Vec::new(),
        },
        members: (0..n)
            .map(|_| Member {
                id: format!("{:016x}{:016x}", rng.u64(..), rng.u64(..)),
                state: MemberState::Flagged,
                fingerprint: 0,
            })
            .collect(),
    };
    Encoded::from_parts(audience::encode(&a)).unwrap()
}

/// A fence that never closes and does not read the export again (it is not in the API).
fn open() -> Fence {
    Fence::term_only(CancellationToken::new())
}

fn names(server: &FakeApiServer) -> Vec<String> {
    server
        .list(SECRETS)
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn saves_in_owned_parts_and_loads_back_the_latest_generation() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let e = export("churn-risk", "uid-42");
    assert!(load_audience(&api, &e).await.unwrap().is_none());

    let big = audience(60_000, 1);
    assert!(big.parts().len() >= 2, "{} parts", big.parts().len());
    save_audience(&api, &e, &big, &open()).await.unwrap();
    assert_eq!(load_audience(&api, &e).await.unwrap().as_ref(), Some(&big));
    let stored = server.list(SECRETS);
    assert_eq!(stored.len(), big.parts().len() + 1);
    for s in &stored {
        let owner = &s["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"], &owner["controller"]),
            (&json!("BrazeExport"), &json!("uid-42"), &json!(true))
        );
        assert_eq!(s["metadata"]["labels"][OWNER_LABEL], "uid-42");
        assert_eq!(s["type"], "Opaque");
        let size = s["data"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .len();
        assert!(size < 1 << 20, "base64 data of {size} bytes");
    }
    let mut first = names(&server);
    first.sort();
    assert_eq!(first[0], "churn-risk-audience");
    assert!(
        first[1..]
            .iter()
            .all(|n| n.starts_with("churn-risk-audience-1-"))
    );

    // A new generation replaces it; the old parts go.
    let small = audience(10, 2);
    save_audience(&api, &e, &small, &open()).await.unwrap();
    assert_eq!(
        load_audience(&api, &e).await.unwrap().as_ref(),
        Some(&small)
    );
    let mut now = names(&server);
    now.sort();
    assert_eq!(now, ["churn-risk-audience", "churn-risk-audience-2-0"]);

    delete_audience(&api, &e).await.unwrap();
    assert!(names(&server).is_empty());
    assert!(load_audience(&api, &e).await.unwrap().is_none());
}

#[tokio::test]
async fn a_crashed_save_never_mixes_generations() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let e = export("churn-risk", "uid-42");
    let first = audience(10, 1);
    save_audience(&api, &e, &first, &open()).await.unwrap();
    // A save that crashed after writing its part, before the manifest: generation 2 exists.
    let stray = server
        .get(SECRETS, NS, "churn-risk-audience-1-0")
        .map(|mut s| {
            s["metadata"]["name"] = json!("churn-risk-audience-2-0");
            s["metadata"]["labels"]["looker-braze.dev/audience-generation"] = json!("2");
            s["data"]["part"] = json!(apiserver::base64(b"half-written"));
            s
        })
        .unwrap();
    server.put(SECRETS, stray);
    assert_eq!(
        load_audience(&api, &e).await.unwrap().as_ref(),
        Some(&first)
    );
    // The next save goes above the stray generation and clears it.
    let second = audience(5, 2);
    save_audience(&api, &e, &second, &open()).await.unwrap();
    let mut now = names(&server);
    now.sort();
    assert_eq!(now, ["churn-risk-audience", "churn-risk-audience-3-0"]);
    assert_eq!(
        load_audience(&api, &e).await.unwrap().as_ref(),
        Some(&second)
    );
}

#[tokio::test]
async fn damage_and_foreign_secrets_are_refused() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let e = export("churn-risk", "uid-42");
    save_audience(&api, &e, &audience(10, 1), &open())
        .await
        .unwrap();
    let mut part: Value = server.get(SECRETS, NS, "churn-risk-audience-1-0").unwrap();
    part["data"]["part"] = json!(apiserver::base64(b"tampered"));
    server.put(SECRETS, part);
    let err = load_audience(&api, &e).await.unwrap_err();
    assert!(matches!(err, StoreError::Damaged(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "the stored audience is damaged: the part churn-risk-audience-1-0 does not match its checksum"
    );
    // Another export of the same name (recreated: a new uid) does not read it.
    let again = export("churn-risk", "uid-43");
    let err = load_audience(&api, &again).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the Secret {} is not this export's audience (another owner)",
            manifest_name("churn-risk")
        )
    );
}

/// The export `name` created in the API server (which gives it its uid), as read back.
async fn created(server: &FakeApiServer, name: &str) -> BrazeExport {
    let mut object = serde_json::to_value(export(name, "ignored")).unwrap();
    object["metadata"].as_object_mut().unwrap().remove("uid");
    server.put(apiserver::EXPORTS, object);
    let api: Api<BrazeExport> = Api::namespaced(server.client(), NS);
    api.get(name).await.unwrap()
}

fn fenced(server: &FakeApiServer, term: &CancellationToken) -> Fence {
    Fence::new(term.clone(), Api::namespaced(server.client(), NS))
}

/// A deleted and recreated namesake (`kubectl replace --force`): the late save of the old
/// export's run, before or after the new export's first save, never writes the audience.
#[tokio::test]
async fn a_late_save_of_a_recreated_namesake_never_replaces_the_live_audience() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let term = CancellationToken::new();
    let old = created(&server, "churn-risk").await;
    save_audience(&api, &old, &audience(10, 1), &fenced(&server, &term))
        .await
        .unwrap();

    server.delete(apiserver::EXPORTS, NS, "churn-risk");
    let new = created(&server, "churn-risk").await;
    assert_ne!(old.metadata.uid, new.metadata.uid);
    // Before the new export saved: the old one's run reads that its export is gone.
    let late = save_audience(&api, &old, &audience(20, 2), &fenced(&server, &term)).await;
    assert!(matches!(late, Err(StoreError::Fenced(_))), "{late:?}");
    assert_eq!(
        late.unwrap_err().to_string(),
        "the audience was not written: the export was deleted or recreated"
    );
    assert!(load_audience(&api, &new).await.unwrap().is_none());
    assert!(names(&server).is_empty(), "{:?}", names(&server));

    // After it: the manifest is the new export's, never replaced by another uid.
    let live = audience(5, 3);
    save_audience(&api, &new, &live, &fenced(&server, &term))
        .await
        .unwrap();
    let late = save_audience(&api, &old, &audience(20, 2), &fenced(&server, &term)).await;
    assert!(late.is_err());
    // Even without reading the export again: the manifest's owner decides.
    let late = save_audience(&api, &old, &audience(20, 2), &open()).await;
    assert!(matches!(late, Err(StoreError::NotOwned(_))), "{late:?}");
    assert_eq!(
        load_audience(&api, &new).await.unwrap().as_ref(),
        Some(&live)
    );
    let manifest = server.get(SECRETS, NS, "churn-risk-audience").unwrap();
    assert_eq!(
        manifest["metadata"]["labels"][OWNER_LABEL],
        json!(new.metadata.uid)
    );
}

/// A save after its writer's term ended (a lost Lease, a shutdown) writes nothing.
#[tokio::test]
async fn a_save_after_the_term_ended_is_refused() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let e = created(&server, "churn-risk").await;
    let term = CancellationToken::new();
    let first = audience(10, 1);
    save_audience(&api, &e, &first, &fenced(&server, &term))
        .await
        .unwrap();
    term.cancel();
    let late = save_audience(&api, &e, &audience(20, 2), &fenced(&server, &term)).await;
    assert!(matches!(late, Err(StoreError::Fenced(_))), "{late:?}");
    assert_eq!(
        late.unwrap_err().to_string(),
        "the audience was not written: this instance's leadership term ended"
    );
    assert_eq!(
        load_audience(&api, &e).await.unwrap().as_ref(),
        Some(&first)
    );
    let mut now = names(&server);
    now.sort();
    assert_eq!(now, ["churn-risk-audience", "churn-risk-audience-1-0"]);
    let refused = discard_audience(&api, &e, &fenced(&server, &term)).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert_eq!(names(&server).len(), 2);
}

/// Discarding deletes the export's own audience and a manifest a namesake left behind.
#[tokio::test]
async fn discarding_deletes_the_audience_and_a_foreign_manifest() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let e = created(&server, "churn-risk").await;
    let term = CancellationToken::new();
    save_audience(&api, &e, &audience(10, 1), &fenced(&server, &term))
        .await
        .unwrap();
    discard_audience(&api, &e, &fenced(&server, &term))
        .await
        .unwrap();
    assert!(names(&server).is_empty(), "{:?}", names(&server));
    // A manifest of its name labelled with another uid: unreadable, then discarded.
    save_audience(
        &api,
        &export("churn-risk", "uid-gone"),
        &audience(3, 2),
        &open(),
    )
    .await
    .unwrap();
    assert!(matches!(
        load_audience(&api, &e).await,
        Err(StoreError::NotOwned(_))
    ));
    discard_audience(&api, &e, &fenced(&server, &term))
        .await
        .unwrap();
    assert!(load_audience(&api, &e).await.unwrap().is_none());
    let again = audience(4, 3);
    save_audience(&api, &e, &again, &fenced(&server, &term))
        .await
        .unwrap();
    assert_eq!(
        load_audience(&api, &e).await.unwrap().as_ref(),
        Some(&again)
    );
}

/// A manifest of the export's name that names a *live* export as its owner (a label proves
/// nothing): discarding removes that manifest, never the live export's audience.
#[tokio::test]
async fn discarding_never_deletes_a_live_export_s_audience() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let (a, b) = (
        created(&server, "churn-risk").await,
        created(&server, "vip").await,
    );
    let term = CancellationToken::new();
    let kept = audience(5, 1);
    save_audience(&api, &b, &kept, &fenced(&server, &term))
        .await
        .unwrap();
    // A forged manifest named after churn-risk, labelled with vip's uid.
    server.put(
        SECRETS,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "churn-risk-audience", "namespace": NS,
                         "labels": {"looker-braze.dev/audience-of": b.metadata.uid}},
            "data": {"manifest": "e30="}
        }),
    );
    discard_audience(&api, &a, &fenced(&server, &term))
        .await
        .unwrap();
    assert_eq!(
        load_audience(&api, &b).await.unwrap().as_ref(),
        Some(&kept),
        "vip's audience stays"
    );
}

/// The generations of the parts stored now, lowest first.
fn generations(server: &FakeApiServer) -> Vec<u64> {
    let mut g: Vec<u64> = server
        .list(SECRETS)
        .iter()
        .filter_map(|s| s["metadata"]["labels"]["looker-braze.dev/audience-generation"].as_str())
        .map(|g| g.parse().unwrap())
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

/// The most generations of parts that were ever stored at once, replayed from the requests in
/// their order (a part's generation read from its name, `churn-risk-audience-<g>-<i>`).
fn most_generations_at_once(server: &FakeApiServer) -> usize {
    let generation = |name: &str| {
        let rest = name.strip_prefix("churn-risk-audience-")?;
        rest.split('-').next()?.parse::<u64>().ok()
    };
    let mut created = server
        .writes()
        .into_iter()
        .filter(|w| w.method == "POST" && w.resource == SECRETS)
        .map(|w| w.name);
    let mut live = std::collections::BTreeSet::new();
    let mut most = 0;
    for r in server.requests() {
        if r.starts_with("POST /api/v1/namespaces/marketing/secrets") {
            live.insert(created.next().expect("a POST is a write"));
        } else if let Some(path) = r.strip_prefix("DELETE /api/v1/namespaces/marketing/secrets/") {
            let name = path.split(['?', ' ']).next().unwrap();
            live.remove(name);
        }
        let at_once: std::collections::BTreeSet<u64> =
            live.iter().filter_map(|n| generation(n)).collect();
        most = most.max(at_once.len());
    }
    most
}

/// Secrets the way the operator's Role allows them, but without `update`: a save over an
/// existing manifest fails at its switch, after it wrote its parts.
fn cannot_replace_manifests(server: &FakeApiServer) -> Api<Secret> {
    let rules = vec![apiserver::Rule {
        api_groups: vec![String::new()],
        resources: vec!["secrets".into()],
        verbs: ["get", "list", "watch", "create", "patch", "delete"]
            .map(String::from)
            .to_vec(),
        resource_names: vec![],
    }];
    Api::namespaced(server.client_with_rules(rules), NS)
}

#[tokio::test]
async fn a_save_deletes_the_parts_of_failed_saves_first_and_never_holds_three_generations() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let failing = cannot_replace_manifests(&server);
    let e = export("churn-risk", "uid-42");
    let first = audience(60_000, 1);
    assert!(first.parts().len() >= 2, "{} parts", first.parts().len());
    save_audience(&api, &e, &first, &open()).await.unwrap();
    assert_eq!(generations(&server), [1]);

    // Two saves that fail at the switch: each leaves its parts, the next deletes them.
    let err = save_audience(&failing, &e, &audience(60_000, 2), &open())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Kube(_)), "{err}");
    assert_eq!(generations(&server), [1, 2]);
    save_audience(&failing, &e, &audience(60_000, 3), &open())
        .await
        .unwrap_err();
    assert_eq!(
        generations(&server),
        [1, 3],
        "the failed save's parts went first"
    );
    assert_eq!(
        load_audience(&api, &e).await.unwrap().as_ref(),
        Some(&first),
        "the generation in force stays"
    );

    let last = audience(60_000, 4);
    save_audience(&api, &e, &last, &open()).await.unwrap();
    assert_eq!(generations(&server), [4]);
    assert_eq!(load_audience(&api, &e).await.unwrap().as_ref(), Some(&last));
    assert_eq!(most_generations_at_once(&server), 2);
}

#[tokio::test]
async fn saving_and_deleting_never_list_or_read_the_parts_whole() {
    let server = FakeApiServer::start().await;
    let api: Api<Secret> = Api::namespaced(server.client(), NS);
    let e = export("churn-risk", "uid-42");
    save_audience(&api, &e, &audience(60_000, 1), &open())
        .await
        .unwrap();
    save_audience(&api, &e, &audience(60_000, 2), &open())
        .await
        .unwrap();
    delete_audience(&api, &e).await.unwrap();
    assert!(names(&server).is_empty());

    let secrets = "/api/v1/namespaces/marketing/secrets";
    let manifest = format!("{secrets}/churn-risk-audience");
    let reads: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(&format!("GET {secrets}")))
        .collect();
    assert!(
        reads
            .iter()
            .any(|r| r.starts_with(&format!("GET {secrets}?")) && r.ends_with(" (metadata)")),
        "{reads:#?}"
    );
    for r in &reads {
        let path = r["GET ".len()..].split(['?', ' ']).next().unwrap();
        assert!(
            r.ends_with(" (metadata)") || path == manifest,
            "only the manifest is read whole: {r}"
        );
    }
}
