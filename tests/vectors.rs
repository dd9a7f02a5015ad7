//! The test vectors of `tests/vectors/*.json` (specified in
//! docs/wire-format.md): the library must reproduce every canonical
//! encoding, id and signature, and a real server must assign the same ids.
//! `tests/vectors/check.py` checks the same files with an independent Python
//! implementation of the document.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use stemedb::model::parse::ParseOptions;
use stemedb::model::{canonical, parse_assertion, signature};

struct Vector {
    name: String,
    v: Value,
}

impl Vector {
    fn str(&self, key: &str) -> &str {
        self.v[key].as_str().unwrap_or_else(|| panic!("{}: {key} is not a string", self.name))
    }

    fn opt(&self, key: &str) -> Option<&str> {
        match &self.v[key] {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => panic!("{}: {key} is {other}, expected a string or null", self.name),
        }
    }

    fn input(&self) -> &Value {
        &self.v["input"]
    }
}

/// Every vector, in file-name order (later vectors may supersede earlier ones).
fn vectors() -> Vec<Vector> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read tests/vectors")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
            Vector { name, v }
        })
        .collect()
}

fn key_from_seed(seed_hex: &str) -> SigningKey {
    let mut seed = [0u8; 32];
    hex::decode_to_slice(seed_hex, &mut seed).expect("seed_hex is 32 bytes of hex");
    SigningKey::from_bytes(&seed)
}

#[test]
fn vectors_cover_the_format() {
    let vs = vectors();
    assert!(vs.len() >= 8, "expected at least 8 vectors, found {}", vs.len());
    let types: BTreeSet<&str> = vs.iter().filter_map(|v| v.input()["object"]["type"].as_str()).collect();
    assert_eq!(types, BTreeSet::from(["boolean", "entity", "integer", "number", "text", "time"]), "every object type has a vector");
    let has = |pred: &dyn Fn(&Value) -> bool| vs.iter().any(|v| pred(v.input()));
    assert!(has(&|i| i["source"]["tier"].is_string() && i["source"]["hash"].is_string()), "a source with tier and hash");
    assert!(has(&|i| i["source"].is_object() && i["source"].get("tier").is_none()), "a source without tier");
    assert!(has(&|i| i["valid_time"].as_str().is_some_and(|t| !t.ends_with('Z'))), "a valid_time with an offset");
    assert!(has(&|i| i["supersedes"].as_array().is_some_and(|a| a.len() == 2 && a[0].as_str() > a[1].as_str())), "supersedes out of order");
    assert!(has(&|i| i["object"]["value"].as_f64().is_some_and(|x| x == 0.0 && x.is_sign_negative())), "a -0.0 number");
    assert!(has(&|i| i["object"]["value"].as_str().is_some_and(|s| !s.is_ascii())), "non-ASCII text");
    assert!(has(&|i| i.get("signature").is_some_and(Value::is_string)), "a signed vector");
    assert!(has(&|i| i.get("signature").is_none_or(Value::is_null)), "an unsigned vector");
    assert!(has(&|i| i.as_object().is_some_and(|m| m.values().any(Value::is_null))), "null fields");
}

#[test]
fn vectors_match_the_library() {
    for vec in vectors() {
        let name = &vec.name;
        let (id, a) = parse_assertion(vec.input(), ParseOptions::default()).unwrap_or_else(|e| panic!("{name}: rejected: {e:?}"));
        assert_eq!(hex::encode(canonical::encode(&a)), vec.str("canonical_hex"), "{name}: canonical bytes");
        assert_eq!(id.to_hex(), vec.str("id"), "{name}: id");
        assert_eq!(a.id(), id, "{name}: Assertion::id agrees with parse_assertion");

        let signed = parse_assertion(vec.input(), ParseOptions { require_signatures: true });
        match vec.opt("seed_hex") {
            None => {
                assert!(vec.opt("signature_hex").is_none() && vec.opt("public_key_hex").is_none(), "{name}: unsigned vector");
                assert!(a.signature.is_none(), "{name}: unsigned input");
                assert!(signed.is_err(), "{name}: an unsigned vector is refused when signatures are required");
            }
            Some(seed) => {
                let key = key_from_seed(seed);
                let pk = hex::encode(key.verifying_key().as_bytes());
                assert_eq!(pk, vec.str("public_key_hex"), "{name}: public key from seed");
                assert_eq!(a.agent, pk, "{name}: the agent is the public key");
                let sig = hex::encode(key.sign(id.as_bytes()).to_bytes());
                assert_eq!(sig, vec.str("signature_hex"), "{name}: deterministic signature of the id");
                assert_eq!(a.signature.as_deref(), Some(sig.as_str()), "{name}: the input carries the signature");
                signature::verify(&a.agent, id.as_bytes(), &sig).unwrap_or_else(|e| panic!("{name}: signature: {e}"));
                assert!(signed.is_ok(), "{name}: accepted when signatures are required");

                let msg = signature::retraction_message(&id);
                assert_eq!(hex::encode(msg), vec.str("retraction_message_hex"), "{name}: retraction message");
                let rsig = hex::encode(key.sign(&msg).to_bytes());
                assert_eq!(rsig, vec.str("retraction_signature_hex"), "{name}: retraction signature");
                signature::verify(&a.agent, &msg, &rsig).unwrap_or_else(|e| panic!("{name}: retraction signature: {e}"));
                assert!(signature::verify(&a.agent, &msg, &sig).is_err(), "{name}: an assertion signature is not a retraction signature");

                // The signature commits to every field: change one and it no longer verifies.
                let mut tampered = vec.input().clone();
                tampered["predicate"] = json!(format!("{}-tampered", a.predicate));
                let errs = parse_assertion(&tampered, ParseOptions::default()).expect_err("tampered input must be refused");
                assert_eq!(errs[0].field, "signature", "{name}: {errs:?}");
            }
        }
    }
}

#[tokio::test]
async fn vectors_get_the_same_ids_from_a_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = common::Server::start(&tmp.path().join("data"), &[]);
    let c = common::client();
    let vs = vectors();
    for vec in &vs {
        let (st, _, body) = common::post_json(&c, &server.url("/v1/assertions"), vec.input()).await;
        assert!(st == 201 || st == 200, "{}: status {st}: {body}", vec.name);
        assert_eq!(body["id"], vec.v["id"], "{}: server id", vec.name);
    }
    // Retractions of the signed vectors, with the signatures the vectors give.
    for vec in vs.iter().filter(|v| v.opt("seed_hex").is_some()) {
        let url = server.url(&format!("/v1/assertions/{}/retractions", vec.str("id")));
        let agent = vec.str("public_key_hex");
        let replay = json!({"agent": agent, "signature": vec.str("signature_hex")});
        let (st, _, body) = common::post_json(&c, &url, &replay).await;
        assert_eq!(st, 422, "{}: the assertion's own signature must not retract it: {body}", vec.name);
        let good = json!({"agent": agent, "reason": "test vector", "signature": vec.str("retraction_signature_hex")});
        let (st, _, body) = common::post_json(&c, &url, &good).await;
        assert_eq!(st, 201, "{}: retraction: {body}", vec.name);
        assert_eq!(body["id"], vec.v["id"], "{}", vec.name);
    }
}
