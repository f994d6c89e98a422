//! Tests of the stored audience: encoding, parts, damage, files and the removal permission.

use std::collections::BTreeMap;

use super::writer::BodyWriter;
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
    // Sorted by identifier.
    let mut want = a.members.clone();
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(back.members[1234], want[1234]);
    assert_eq!(back.members, want);
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
        "it is of version 9, and this build reads versions 1 to 3"
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
    // Written again, it is of version 3.
    assert_eq!(encode(&a)[0][4], 3);
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

/// A random UUID (version 4) in lower case (the sandbox's, of a random number).
fn random_uuid(rng: &mut fastrand::Rng) -> String {
    crate::sandbox::looker::uuid(rng.u64(..))
}

/// The bytes a user of an audience of `ids` (in the order given), with fingerprints when
/// `fingerprints`, pending every tenth.
fn bytes_a_user(ids: impl Iterator<Item = String>, fingerprints: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let scratch = crate::spill::Scratch::new(Some(dir.path().into()));
    let mut w = BodyWriter::spilling(&scratch, 8 << 20);
    let mut rng = fastrand::Rng::with_seed(11);
    for (i, id) in ids.enumerate() {
        let state = if i % 10 == 3 {
            MemberState::Pending
        } else {
            MemberState::Flagged
        };
        let fp = if fingerprints { rng.u32(1..) } else { 0 };
        w.push(&id, state, fp);
    }
    let e = Encoded::build(header(), w, &Output::Memory).unwrap();
    e.len_bytes() as f64 / e.header().members as f64
}

#[test]
fn a_million_random_uuids_take_at_most_16_bytes_a_user_and_20_with_fingerprints() {
    let n = 1_000_000;
    let mut rng = fastrand::Rng::with_seed(5);
    let uuids: Vec<String> = (0..n).map(|_| random_uuid(&mut rng)).collect();
    let plain = bytes_a_user(uuids.iter().cloned(), false);
    let with = bytes_a_user(uuids.iter().cloned(), true);
    let upper = bytes_a_user(uuids.iter().map(|u| u.to_uppercase()), false);
    eprintln!("UUIDs: {plain:.2}, with fingerprints {with:.2}, upper case {upper:.2}");
    assert!(plain <= 16.0, "{plain:.2} bytes a user");
    assert!(with <= 20.0, "{with:.2} bytes a user with fingerprints");
    // A random fingerprint costs its 4 bytes, and no more.
    assert!(
        with - plain <= 4.1,
        "{plain:.2}, then {with:.2} with fingerprints"
    );
    assert!(upper <= 16.0, "{upper:.2} bytes a user in upper case");
}

#[test]
fn a_million_sequential_ids_take_at_most_4_bytes_a_user_and_8_with_fingerprints() {
    let n = 1_000_000u64;
    // Taken in a shuffled order, as a Look may give them.
    let mut order: Vec<u64> = (1..=n).collect();
    fastrand::Rng::with_seed(9).shuffle(&mut order);
    let ids = || order.iter().map(|i| format!("user-{i:08}"));
    let plain = bytes_a_user(ids(), false);
    let with = bytes_a_user(ids(), true);
    let numbers = bytes_a_user(order.iter().map(|i| i.to_string()), false);
    eprintln!("sequential: {plain:.2}, with fingerprints {with:.2}, bare numbers {numbers:.2}");
    assert!(plain <= 4.0, "{plain:.2} bytes a user");
    assert!(with <= 8.0, "{with:.2} bytes a user with fingerprints");
    assert!(
        with - plain <= 4.1,
        "{plain:.2}, then {with:.2} with fingerprints"
    );
    assert!(numbers <= 4.0, "{numbers:.2} bytes a user, bare numbers");
}

#[test]
fn every_cut_of_an_encoded_audience_is_an_error() {
    let mut a = audience(60);
    let mut rng = fastrand::Rng::with_seed(2);
    for m in a.members.iter_mut().step_by(3) {
        m.id = random_uuid(&mut rng);
    }
    let bytes = encode(&a).concat();
    decode(vec![bytes.clone()]).unwrap();
    for cut in 0..bytes.len() {
        let r = decode(vec![bytes[..cut].to_vec()]);
        assert!(r.is_err(), "cut at {cut}");
        if let Err(e) = r {
            assert!(!e.to_string().contains("user-"), "{e}");
        }
    }
}

#[test]
fn an_audience_of_version_2_is_still_read_in_memory_and_from_a_file() {
    let mut h = header();
    h.members = 3;
    let members = [
        ("user-2", MemberState::Flagged, 7),
        (
            "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            MemberState::Pending,
            0,
        ),
        ("user-1", MemberState::Flagged, 9),
    ];
    let bytes = codec::v2::audience_bytes(&h, &members);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    std::fs::write(&path, &bytes).unwrap();
    for e in [
        Encoded::from_bytes(bytes).unwrap(),
        read_file(&path).unwrap().unwrap(),
    ] {
        e.verify().unwrap();
        let mut r = e.members().unwrap();
        let mut got = Vec::new();
        while let Some((id, s, fp)) = r.next_member().unwrap() {
            got.push((id.to_owned(), s, fp));
        }
        let want: Vec<_> = members
            .iter()
            .map(|(id, s, fp)| ((*id).to_owned(), *s, *fp))
            .collect();
        assert_eq!(got, want);
    }
}

#[test]
fn an_audience_built_beside_its_state_file_is_renamed_into_place_and_read_lazily() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let mut w = BodyWriter::spilling(&crate::spill::Scratch::new(Some(dir.path().into())), 300);
    for i in (0..500).rev() {
        w.push(&format!("user-{i:04}"), MemberState::Flagged, i);
    }
    let e = Encoded::build(header(), w, &Output::Beside(path.clone())).unwrap();
    assert!(e.in_file());
    assert_eq!(e.header().members, 500);
    // Only the temporary beside it (the spill files are anonymous).
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    e.verify().unwrap();
    write_file(&path, &e).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|n| n.unwrap().file_name())
        .collect();
    assert_eq!(names, ["state.bin"], "renamed, not copied");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    drop(e);
    assert!(
        path.exists(),
        "a saved audience is not removed when dropped"
    );
    let back = read_file(&path).unwrap().unwrap();
    assert!(back.in_file());
    // Read twice, and while it is replaced: the open file is read, not the path.
    for _ in 0..2 {
        let mut r = back.members().unwrap();
        let mut n = 0;
        while let Some((id, _, fp)) = r.next_member().unwrap() {
            assert_eq!(id, format!("user-{n:04}"));
            assert_eq!(fp, n);
            n += 1;
        }
        assert_eq!(n, 500);
        let again = Encoded::from_parts(encode(&audience(2))).unwrap();
        write_file(&path, &again).unwrap();
    }
    assert_eq!(back.parts().concat().len(), back.len_bytes());
    let from_parts = Encoded::from_parts(back.parts().to_vec()).unwrap();
    assert_eq!(from_parts, back);
}

#[test]
fn an_audience_built_beside_and_never_saved_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let mut w = BodyWriter::new(1);
    w.push("user-1", MemberState::Flagged, 0);
    let e = Encoded::build(header(), w, &Output::Beside(path.clone())).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    drop(e);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // A directory that cannot be written: the error says why, and names no user.
    let gone = dir.path().join("gone").join("state.bin");
    let mut w = BodyWriter::new(1);
    w.push("user-1", MemberState::Flagged, 0);
    let err = Encoded::build(header(), w, &Output::Beside(gone)).unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
}

/// The sizes at 5,000,000 users, for the notes (`cargo test --lib five_million -- --ignored
/// --nocapture`): too slow for every run.
#[test]
#[ignore]
fn five_million_users_measured() {
    let n = 5_000_000;
    let uuids = || {
        let mut rng = fastrand::Rng::with_seed(5);
        (0..n).map(move |_| random_uuid(&mut rng))
    };
    let plain = bytes_a_user(uuids(), false);
    let with = bytes_a_user(uuids(), true);
    let mut order: Vec<u64> = (1..=n as u64).collect();
    fastrand::Rng::with_seed(9).shuffle(&mut order);
    let seq = bytes_a_user(order.iter().map(|i| format!("user-{i:08}")), false);
    let seq_fp = bytes_a_user(order.iter().map(|i| format!("user-{i:08}")), true);
    eprintln!(
        "5M: UUIDs {plain:.2}, with fingerprints {with:.2}; sequential {seq:.2}, with fingerprints {seq_fp:.2}"
    );
}
