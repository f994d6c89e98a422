//! The stored audience in Secrets (`audience_store`) against the project's fake API server:
//! parts under the Secret limit owned by the export, a manifest written last, old generations
//! deleted, and a crashed save that never mixes generations.

#[path = "support/fake.rs"]
mod fake;

use braze_export_operator::audience::{
    self, Audience, Encoded, Header, Member, MemberState, Owner,
};
use braze_export_operator::controller::audience_store::{
    OWNER_LABEL, StoreError, delete_audience, load_audience, manifest_name, save_audience,
};
use braze_export_operator::spec::{BrazeExport, IdentifierKind};
use fake::Start as _;
use fake_apiserver::{self as apiserver, FakeApiServer, SECRETS};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};

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
        },
        members: (0..n)
            .map(|_| Member {
                id: format!("{:016x}{:016x}", rng.u64(..), rng.u64(..)),
                state: MemberState::Flagged,
            })
            .collect(),
    };
    Encoded::from_parts(audience::encode(&a)).unwrap()
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
    save_audience(&api, &e, &big).await.unwrap();
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
    save_audience(&api, &e, &small).await.unwrap();
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
    save_audience(&api, &e, &first).await.unwrap();
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
    save_audience(&api, &e, &second).await.unwrap();
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
    save_audience(&api, &e, &audience(10, 1)).await.unwrap();
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
