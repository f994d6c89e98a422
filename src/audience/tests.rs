//! Tests of the stored audience: encoding, parts, damage, files and the removal permission.

use std::collections::BTreeMap;

use super::codec::BodyWriter;
use super::*;
use crate::schedule::RUN_NOW_ANNOTATION;
use crate::spec::{BrazeExportSpec, BrazeExportStatus, IdentifierKind, RemovalMode};

fn header() -> Header {
    Header {
        export: Owner {
            namespace: Some("marketing".into()),
            name: "churn-risk".into(),
        },
        identifier: IdentifierKind::ExternalId,
        alias_label: None,
        attribute: "looker_export".into(),
        export_name: "CHURN_RISK".into(),
        last_full_resync: Some("2026-11-29T06:00:00Z".parse().unwrap()),
        members: 0,
        workspace: Some("0123456789abcdef".into()),
        stray_flags: Vec::new(),
    }
}

fn audience(n: usize) -> Audience {
    Audience {
        header: header(),
        members: (0..n)
            .map(|i| Member {
                id: format!("user-{i:07}"),
                state: if i % 10 == 3 {
                    MemberState::Pending
                } else {
                    MemberState::Flagged
                },
                fingerprint: i as u32,
            })
            .collect(),
    }
}

#[test]
fn encode_and_decode_round_trip() {
    for n in [0, 1, 1000] {
        let a = audience(n);
        let back = decode(encode(&a)).unwrap();
        assert_eq!(back.members, a.members);
        assert_eq!(back.header.members, n as u64);
        assert_eq!(
            Header {
                members: 0,
                ..back.header
            },
            a.header
        );
    }
}

#[test]
fn a_large_audience_is_split_into_parts_under_the_secret_limit() {
    // Identifiers that compress badly: 200,000 random hex strings.
    let mut a = audience(0);
    a.members = (0..200_000)
        .map(|_| Member {
            id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            state: MemberState::Flagged,
            fingerprint: 0,
        })
        .collect();
    let parts = encode(&a);
    assert!(parts.len() > 1, "{} parts", parts.len());
    assert!(parts.iter().all(|p| p.len() <= MAX_PART_BYTES));
    // base64 of a part, as a Secret holds it, stays under 1 MiB
    assert!(MAX_PART_BYTES.div_ceil(3) * 4 < 1 << 20);
    let back = decode(parts).unwrap();
    assert_eq!(back.members.len(), 200_000);
    assert_eq!(back.members[1234], a.members[1234]);
}

#[test]
fn ordinary_identifiers_take_a_few_bytes_each() {
    let n = 200_000;
    let mut body = BodyWriter::new(6);
    for i in 0..n {
        body.push(&format!("user-{i:07}"), MemberState::Flagged, 0);
    }
    let e = Encoded::new(header(), body);
    assert!(e.len_bytes() < n * 4, "{} bytes", e.len_bytes());
    e.verify().unwrap();
}

#[test]
fn damage_is_an_error_never_a_panic_and_names_no_user() {
    let bytes: Vec<u8> = encode(&audience(300)).concat();
    assert!(matches!(
        Encoded::from_bytes(b"hello".to_vec()),
        Err(AudienceError::NotAnAudience)
    ));
    let mut newer = bytes.clone();
    newer[4] = 9;
    assert_eq!(
        Encoded::from_bytes(newer).unwrap_err().to_string(),
        "it is of version 9, and this build reads versions 1 to 2"
    );
    for cut in [3, 9, 40, bytes.len() / 2, bytes.len() - 1] {
        let r = decode(vec![bytes[..cut].to_vec()]);
        assert!(r.is_err(), "cut at {cut}");
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let mut errors = 0;
    for _ in 0..2000 {
        let mut b = bytes.clone();
        let i = rng.usize(..b.len());
        b[i] ^= 1 << rng.u8(..8);
        if let Err(e) = decode(vec![b]) {
            errors += 1;
            assert!(!e.to_string().contains("user-"), "{e}");
        }
    }
    assert!(errors > 1900, "{errors} of 2000 flips were caught");
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"junk");
    // Bytes after the zlib stream are not part of it; the body still reads whole.
    let _ = decode(vec![trailing]);
}

#[test]
fn member_debug_hides_the_identifier() {
    let m = Member {
        id: "user-secret".into(),
        state: MemberState::Flagged,
        fingerprint: 9,
    };
    assert_eq!(format!("{m:?}"), "Member(<11 bytes>, Flagged)");
    let e = Encoded::from_parts(encode(&audience(3))).unwrap();
    assert!(!format!("{e:?}").contains("user-"));
}

#[test]
fn another_export_or_identifier_type_is_refused() {
    let h = header();
    let me = h.export.clone();
    assert!(h.check(&me, IdentifierKind::ExternalId, None).is_ok());
    let other = Owner {
        namespace: Some("marketing".into()),
        name: "vip".into(),
    };
    assert_eq!(
        h.check(&other, IdentifierKind::ExternalId, None)
            .unwrap_err(),
        "it belongs to the export marketing/churn-risk, not marketing/vip"
    );
    assert_eq!(
        h.check(&me, IdentifierKind::BrazeId, None).unwrap_err(),
        "it holds external_id identifiers, and this export uses braze_id"
    );
    let alias = Header {
        identifier: IdentifierKind::UserAlias,
        alias_label: Some("a".into()),
        ..header()
    };
    assert!(
        alias
            .check(&me, IdentifierKind::UserAlias, Some("a"))
            .is_ok()
    );
    assert!(
        alias
            .check(&me, IdentifierKind::UserAlias, Some("b"))
            .is_err()
    );
}

#[test]
fn files_are_written_atomically_and_privately() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    assert!(read_file(&path).unwrap().is_none());
    let e = Encoded::from_parts(encode(&audience(5))).unwrap();
    write_file(&path, &e).unwrap();
    let back = read_file(&path).unwrap().unwrap();
    assert_eq!(back, e);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left behind");
}

/// The temporary is a new file of a name nobody can guess: a link or a file someone put
/// where the old predictable name (`.NAME.tmp-PID`) was is neither written through nor
/// reused, and a link at the path itself is replaced, its target untouched.
#[cfg(unix)]
#[test]
fn files_never_write_through_a_link_nor_into_a_file_made_beforehand() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "victim").unwrap();
    let planted = dir
        .path()
        .join(format!(".state.bin.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let e = Encoded::from_parts(encode(&audience(5))).unwrap();
    write_file(&path, &e).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
    assert_eq!(read_file(&path).unwrap().unwrap(), e);

    // Someone else's file at that name (world-readable) is not written into nor renamed.
    std::fs::remove_file(&planted).unwrap();
    std::fs::write(&planted, "theirs").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_file(&path, &e).unwrap();
    assert_eq!(std::fs::read_to_string(&planted).unwrap(), "theirs");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A link at the path: replaced by the file, its target untouched.
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    write_file(&path, &e).unwrap();
    assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    assert_eq!(read_file(&path).unwrap().unwrap(), e);
}

#[test]
fn removal_is_allowed_once_by_the_run_now_request_it_repeats() {
    let yaml = r#"
schedule: "0 6 * * *"
looker: {baseUrl: "https://x.looker.com", lookId: "1", credentialsSecretRef: {name: l}}
braze: {endpoint: "https://rest.iad-01.braze.com", apiKeySecretRef: {name: b}, removal: Remove}
"#;
    let spec: BrazeExportSpec = serde_saphyr::from_str(yaml).unwrap();
    let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let both = ann(&[(RUN_NOW_ANNOTATION, "t1"), (ALLOW_REMOVAL_ANNOTATION, "t1")]);
    let handled = |v: &str| BrazeExportStatus {
        last_handled_run_request: Some(v.into()),
        ..BrazeExportStatus::default()
    };
    assert!(removal_allowed_once(&spec, &both, None));
    assert!(removal_allowed_once(&spec, &both, Some(&handled("t0"))));
    assert!(
        !removal_allowed_once(&spec, &both, Some(&handled("t1"))),
        "once: the request was handled"
    );
    let stale = ann(&[(RUN_NOW_ANNOTATION, "t2"), (ALLOW_REMOVAL_ANNOTATION, "t1")]);
    assert!(!removal_allowed_once(&spec, &stale, Some(&handled("t1"))));
    assert!(!removal_allowed_once(
        &spec,
        &ann(&[(ALLOW_REMOVAL_ANNOTATION, "t1")]),
        None
    ));
    assert!(!removal_allowed_once(
        &spec,
        &ann(&[(RUN_NOW_ANNOTATION, ""), (ALLOW_REMOVAL_ANNOTATION, "")]),
        None
    ));
    let mut keep = spec.clone();
    keep.braze.removal = RemovalMode::Keep;
    assert!(!removal_allowed_once(&keep, &both, None));
}

/// An audience written by version 1 (no fingerprints), as its bytes were.
fn version_1_bytes(header: &Header, members: &[(&str, u8)]) -> Vec<u8> {
    use std::io::Write;
    let mut body = Vec::new();
    for (id, state) in members {
        body.push(*state);
        body.push(id.len() as u8);
        body.extend_from_slice(id.as_bytes());
    }
    body.push(0xFF);
    body.push(members.len() as u8);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    z.write_all(&body).unwrap();
    let json = serde_json::to_vec(header).unwrap();
    let mut out = b"BZXA\x01".to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&z.finish().unwrap());
    out
}

#[test]
fn an_audience_of_version_1_is_still_read_with_unknown_fingerprints() {
    let mut h = header();
    h.workspace = None;
    h.members = 2;
    let bytes = version_1_bytes(&h, &[("u1", 0), ("u2", 1)]);
    let e = Encoded::from_bytes(bytes).unwrap();
    e.verify().unwrap();
    let a = decode(e.into_parts()).unwrap();
    let got: Vec<_> = a
        .members
        .iter()
        .map(|m| (m.id.as_str(), m.state, m.fingerprint))
        .collect();
    assert_eq!(
        got,
        [
            ("u1", MemberState::Flagged, 0),
            ("u2", MemberState::Pending, 0)
        ]
    );
    assert_eq!(a.header.workspace, None);
    // Written again, it is of version 2.
    assert_eq!(encode(&a)[0][4], codec::VERSION);
}

#[test]
fn workspace_fingerprints_are_stable_and_keyed() {
    let a = workspace_fingerprint("https://rest.iad-01.braze.com/users/track", "key-1");
    assert_eq!(a.len(), 16);
    assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        a,
        workspace_fingerprint("https://rest.iad-01.braze.com/users/track", "key-1")
    );
    assert_ne!(
        a,
        workspace_fingerprint("https://rest.iad-01.braze.com/users/track", "key-2")
    );
    assert_ne!(
        a,
        workspace_fingerprint("https://rest.fra-01.braze.eu/users/track", "key-1")
    );
    assert!(!a.contains("key"));
}
