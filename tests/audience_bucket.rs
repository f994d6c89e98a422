//! The stored audience in an S3-compatible bucket, against a real S3 server on loopback
//! (s3s-fs): a manifest and one generation under the export's uid, the old generation
//! deleted, failed saves' objects deleted first, damage refused, the fence before the
//! manifest switch, server-side encryption passed through, pending records beside it, and
//! failures that name the object but never a credential. And the Secrets store's budget.

#[path = "support/bucket.rs"]
mod bucket;
#[path = "support/fake.rs"]
mod fake;

use braze_export_operator::audience::{
    self, Audience, Encoded, Header, Member, MemberState, Owner,
};
use braze_export_operator::bucket::{BucketError, BucketSettings};
use braze_export_operator::controller::audience_store::{Fence, StoreError};
use braze_export_operator::controller::audiences::AudienceStore;
use braze_export_operator::export::PendingLog;
use braze_export_operator::spec::{BrazeExport, IdentifierKind};
use bucket::*;
use fake::Start as _;
use fake_apiserver::{FakeApiServer, SECRETS};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tokio_util::sync::CancellationToken;

const NS: &str = "marketing";
const UID: &str = "5f0c6a2e-uid-of-churn-risk";

fn export(uid: &str) -> BrazeExport {
    let yaml = r#"
schedule: "0 6 * * *"
looker: {baseUrl: "https://x.looker.com", lookId: "1", credentialsSecretRef: {name: l}}
braze: {endpoint: "https://rest.iad-01.braze.com", apiKeySecretRef: {name: b}, removal: Remove}
"#;
    let mut e = BrazeExport::new("churn-risk", serde_saphyr::from_str(yaml).unwrap());
    e.metadata.namespace = Some(NS.into());
    e.metadata.uid = Some(uid.into());
    e
}

fn header() -> Header {
    Header {
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
    }
}

/// The identifier of user `i` of seed `seed`: random hex, which compresses badly.
fn id(seed: u64, i: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003) + i as u64);
    format!("{:016x}{:016x}", rng.u64(..), rng.u64(..))
}

/// An audience of `n` users (in parts when large).
/// Where loaded audiences are kept while they are read.
fn scratch() -> &'static braze_export_operator::spill::Scratch {
    static SCRATCH: std::sync::OnceLock<braze_export_operator::spill::Scratch> =
        std::sync::OnceLock::new();
    SCRATCH.get_or_init(braze_export_operator::spill::Scratch::default)
}

fn audience(n: usize, seed: u64) -> Encoded {
    let a = Audience {
        header: header(),
        members: (0..n)
            .map(|i| Member {
                id: id(seed, i),
                state: MemberState::Flagged,
                fingerprint: 0,
            })
            .collect(),
    };
    Encoded::from_parts(audience::encode(&a)).unwrap()
}

fn open() -> Fence {
    Fence::term_only(CancellationToken::new())
}

/// Secrets of a fake API server that is never called (the bucket store reads none).
async fn no_secrets() -> (FakeApiServer, Api<Secret>) {
    let api = FakeApiServer::start().await;
    let secrets = Api::namespaced(api.client(), NS);
    (api, secrets)
}

fn keys(s3: &S3Server) -> Vec<String> {
    s3.objects()
}

#[tokio::test]
async fn a_save_is_one_generation_and_a_manifest_under_the_export_s_uid() {
    let s3 = S3Server::start().await;
    let store = AudienceStore::Bucket(s3.bucket("prod"));
    let (_api, secrets) = no_secrets().await;
    let e = export(UID);
    let place = store.place(secrets, &e, scratch());
    assert!(
        place.load_with_pending().await.unwrap().0.is_none(),
        "none yet"
    );

    // 60,000 users: several parts, read back chunk by chunk.
    let first = audience(60_000, 1);
    assert!(first.parts().len() >= 2, "{}", first.parts().len());
    place.save(&first, &open()).await.unwrap();
    let g1 = format!("prod/{UID}/audience-00000000000000000001");
    assert_eq!(keys(&s3), [g1.clone(), format!("prod/{UID}/manifest.json")]);
    let concatenated: Vec<u8> = first.parts().concat();
    assert_eq!(
        s3.object(&g1),
        concatenated,
        "the object is the audience's file form"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.object(&format!("prod/{UID}/manifest.json"))).unwrap();
    assert_eq!(manifest["generation"], 1);
    assert_eq!(manifest["members"], 60_000);
    assert_eq!(manifest["object"], "audience-00000000000000000001");
    assert_eq!(
        manifest["parts"].as_array().unwrap().len(),
        first.parts().len()
    );
    let (loaded, records) = place.load_with_pending().await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&first));
    // Read from a file in the scratch directory, not held in memory.
    assert!(loaded.unwrap().in_file());
    assert!(records.is_empty());

    // The next save: generation 2 in force, generation 1 deleted.
    let second = audience(10, 2);
    place.save(&second, &open()).await.unwrap();
    assert_eq!(
        keys(&s3),
        [
            format!("prod/{UID}/audience-00000000000000000002"),
            format!("prod/{UID}/manifest.json")
        ]
    );
    assert_eq!(place.load_with_pending().await.unwrap().0, Some(second));

    // Deleting takes everything, and only this export's.
    let other = export("another-uid");
    let (_api2, secrets2) = no_secrets().await;
    store
        .place(secrets2, &other, scratch())
        .save(&audience(5, 3), &open())
        .await
        .unwrap();
    place.delete().await.unwrap();
    assert!(
        keys(&s3).iter().all(|k| k.starts_with("prod/another-uid/")),
        "{:?}",
        keys(&s3)
    );
    assert!(place.load_with_pending().await.unwrap().0.is_none());
}

#[tokio::test]
async fn a_failed_save_s_generation_is_deleted_first_and_never_read() {
    let s3 = S3Server::start().await;
    let objects = s3.bucket("").audience(UID);
    objects.save(&audience(100, 1)).await.unwrap();
    // A crashed save: its generation written, the manifest never switched.
    let staged = objects.stage(&audience(100, 2)).await.unwrap();
    drop(staged);
    assert_eq!(
        keys(&s3),
        [
            format!("{UID}/audience-00000000000000000001"),
            format!("{UID}/audience-00000000000000000002"),
            format!("{UID}/manifest.json")
        ]
    );
    assert_eq!(
        objects.load().await.unwrap(),
        Some(audience(100, 1)),
        "the one in force"
    );
    // The next save deletes it before writing its own: never three generations.
    objects.save(&audience(100, 3)).await.unwrap();
    assert_eq!(
        keys(&s3),
        [
            format!("{UID}/audience-00000000000000000003"),
            format!("{UID}/manifest.json")
        ]
    );
    assert_eq!(objects.load().await.unwrap(), Some(audience(100, 3)));
}

#[tokio::test]
async fn damaged_objects_are_refused_naming_them() {
    let s3 = S3Server::start().await;
    let objects = s3.bucket("p").audience(UID);
    let a = audience(30_000, 1);
    objects.save(&a).await.unwrap();
    let g = format!("p/{UID}/audience-00000000000000000001");
    let mut bytes = s3.object(&g);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    s3.damage(&g, &bytes);
    let e = objects.load().await.unwrap_err();
    assert!(matches!(e, BucketError::Damaged(_)), "{e:?}");
    assert!(
        e.to_string().starts_with(&format!(
            "the stored audience is damaged: s3://audiences/{g} does not match its checksum"
        )),
        "{e}"
    );
    s3.damage(&g, &bytes[..100]);
    let e = objects.load().await.unwrap_err().to_string();
    assert!(e.ends_with("is shorter than its manifest says"), "{e}");
    s3.damage(&format!("p/{UID}/manifest.json"), b"{not json");
    let e = objects.load().await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "the stored audience is damaged: the manifest s3://audiences/p/{UID}/manifest.json is unreadable"
        )
    );
}

#[tokio::test]
async fn a_save_whose_term_ended_never_switches_the_manifest() {
    let s3 = S3Server::start().await;
    let store = AudienceStore::Bucket(s3.bucket("prod"));
    let (_api, secrets) = no_secrets().await;
    let e = export(UID);
    let place = store.place(secrets, &e, scratch());
    place.save(&audience(10, 1), &open()).await.unwrap();
    let before = keys(&s3);
    let term = CancellationToken::new();
    term.cancel();
    let err = place
        .save(&audience(10, 2), &Fence::term_only(term))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
    assert_eq!(keys(&s3), before, "nothing written, nothing deleted");
    assert_eq!(
        place.load_with_pending().await.unwrap().0,
        Some(audience(10, 1))
    );
}

#[tokio::test]
async fn server_side_encryption_is_asked_on_every_write() {
    let s3 = S3Server::start().await;
    let settings = BucketSettings {
        encryption: Some("AES256".into()),
        ..s3.settings()
    };
    let bucket =
        braze_export_operator::bucket::Bucket::open("s3://audiences/enc", "the test", &settings)
            .unwrap();
    let objects = bucket.audience(UID);
    objects.save(&audience(20, 1)).await.unwrap();
    let log = objects.pending_log(jiff::Timestamp::now(), std::time::Duration::from_secs(5));
    log.record(audience(3, 9)).await.unwrap();
    let writes: Vec<Seen> = s3
        .seen()
        .into_iter()
        // An upload's parts and its completion carry no header: S3 takes it at the start.
        .filter(|s| s.method == "PUT" && !s.path.contains("audience-") || s.method == "POST")
        .collect();
    assert!(writes.len() >= 3, "{writes:?}");
    let creates = writes
        .iter()
        .filter(|s| s.method == "POST" && s.sse.is_some())
        .count();
    assert!(creates >= 1, "the multipart upload asks for it: {writes:?}");
    assert!(
        writes
            .iter()
            .filter(|s| s.method == "PUT")
            .all(|s| s.sse.as_deref() == Some("AES256")),
        "{writes:?}"
    );
}

#[tokio::test]
async fn pending_records_sit_beside_the_audience_and_are_read_with_it() {
    let s3 = S3Server::start().await;
    let objects = s3.bucket("prod").audience(UID);
    objects.save(&audience(10, 1)).await.unwrap();
    let log = objects.pending_log(
        jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        std::time::Duration::from_secs(5),
    );
    log.record(audience(4, 7)).await.unwrap();
    log.record(audience(2, 8)).await.unwrap();
    let written = log.written();
    assert_eq!(
        written,
        [
            "pending-00001800000000000000",
            "pending-00001800000000000001"
        ]
    );
    assert_eq!(
        keys(&s3),
        [
            format!("prod/{UID}/audience-00000000000000000001"),
            format!("prod/{UID}/manifest.json"),
            format!("prod/{UID}/pending-00001800000000000000"),
            format!("prod/{UID}/pending-00001800000000000001"),
        ]
    );
    let (merged, names) = objects.load_with_pending().await.unwrap();
    let merged = merged.unwrap();
    assert_eq!(names, written);
    assert_eq!((merged.pending_len(), merged.pending_members()), (2, 6));
    objects.delete_records(&names).await;
    assert_eq!(keys(&s3).len(), 2, "{:?}", keys(&s3));
}

/// Failures name the object and what went wrong, never the keys (an S3 error body echoes
/// the access key id) nor a user.
#[tokio::test]
async fn a_refusing_or_unreachable_bucket_says_which_object_and_why() {
    let s3 = S3Server::start().await;
    let objects = s3.bucket("prod").audience(UID);
    objects.save(&audience(10, 1)).await.unwrap();
    s3.set_fault(Some(Fault::RefuseWrites));
    let e = objects.save(&audience(10, 2)).await.unwrap_err();
    assert_eq!(e.reason(), "AudienceStoreUnavailable");
    let text = e.to_string();
    assert_eq!(
        text,
        format!(
            "cannot write s3://audiences/prod/{UID}/audience-00000000000000000002: access denied (403): the credentials may not do this; see the bucket's and the role's policy"
        )
    );
    s3.set_fault(None);
    assert_eq!(
        objects.load().await.unwrap(),
        Some(audience(10, 1)),
        "the previous one stays"
    );

    s3.set_fault(Some(Fault::Unavailable));
    let text = objects.load().await.unwrap_err().to_string();
    assert!(
        text.starts_with(&format!(
            "cannot read s3://audiences/prod/{UID}/manifest.json: the server answered 503"
        )),
        "{text}"
    );
    assert!(text.contains("SlowDown"), "{text}");

    // Nobody listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let settings = BucketSettings {
        endpoint: Some(format!("http://{dead}")),
        ..s3.settings()
    };
    let gone = braze_export_operator::bucket::Bucket::open("s3://audiences/prod", "x", &settings)
        .unwrap()
        .audience(UID);
    let text = gone.load().await.unwrap_err().to_string();
    assert_eq!(
        text,
        format!(
            "cannot read s3://audiences/prod/{UID}/manifest.json: cannot connect to the endpoint (is the address right, and the server up?)"
        )
    );
    assert!(
        !text.contains(ACCESS_KEY) && !text.contains(SECRET_KEY),
        "{text}"
    );
}

#[tokio::test]
async fn failures_never_show_the_keys() {
    let s3 = S3Server::start().await;
    let objects = s3.bucket("prod").audience(UID);
    let mut messages = Vec::new();
    for fault in [Fault::RefuseWrites, Fault::Unavailable] {
        s3.set_fault(Some(fault));
        messages.push(
            objects
                .save(&audience(10, 1))
                .await
                .unwrap_err()
                .to_string(),
        );
        if fault == Fault::Unavailable {
            messages.push(objects.load().await.unwrap_err().to_string());
        }
        let log = objects.pending_log(jiff::Timestamp::now(), std::time::Duration::from_secs(5));
        messages.push(log.record(audience(2, 1)).await.unwrap_err());
    }
    // Wrong keys: the server refuses the signature.
    s3.set_fault(None);
    let settings = BucketSettings {
        keys: Some((
            ACCESS_KEY.into(),
            braze_export_operator::redacted::Redacted::new("wrong-secret-do-not-leak"),
        )),
        ..s3.settings()
    };
    let wrong = braze_export_operator::bucket::Bucket::open("s3://audiences/prod", "x", &settings)
        .unwrap()
        .audience(UID);
    messages.push(wrong.load().await.unwrap_err().to_string());
    // Debug forms too (a store in a Config, an error in a log line).
    messages.push(format!(
        "{:?} {:?} s3://audiences/prod/",
        AudienceStore::Bucket(s3.bucket("prod")),
        s3.bucket("prod").audience(UID)
    ));
    for m in &messages {
        assert!(m.contains("s3://audiences/prod/"), "names the object: {m}");
        for secret in [
            ACCESS_KEY,
            SECRET_KEY,
            "wrong-secret-do-not-leak",
            &id(1, 0),
        ] {
            assert!(!m.contains(secret), "{m}");
        }
    }
}

/// The Secrets store refuses an audience over its budget before writing anything, and says
/// where larger audiences go.
#[tokio::test]
async fn the_secrets_store_refuses_an_audience_over_its_budget() {
    let api = FakeApiServer::start().await;
    let secrets: Api<Secret> = Api::namespaced(api.client(), NS);
    let store = AudienceStore::Secrets { budget: 1 << 20 };
    let e = export(UID);
    let place = store.place(secrets, &e, scratch());
    place.save(&audience(100, 1), &open()).await.unwrap();
    let before = api.list(SECRETS).len();
    let big = audience(60_000, 2);
    assert!(big.len_bytes() > 1 << 20);
    let err = place.save(&big, &open()).await.unwrap_err();
    assert_eq!(err.reason(), "AudienceOverBudget");
    assert_eq!(
        err.to_string(),
        format!(
            "the audience takes {:.1} MiB (encoded), over the 1.0 MiB an export may keep in Secrets (--audience-secrets-budget-mib); the previous audience is kept. Keep audiences in an S3-compatible bucket instead: the operator's --audience-store s3://BUCKET/PREFIX (the chart's audienceStore.type: Bucket)",
            big.len_bytes() as f64 / f64::from(1u32 << 20)
        )
    );
    assert_eq!(api.list(SECRETS).len(), before, "nothing written");
    assert_eq!(
        place.load_with_pending().await.unwrap().0,
        Some(audience(100, 1))
    );
}
