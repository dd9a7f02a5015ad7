//! Smallest end-to-end check: a real server accepts, acknowledges and
//! deduplicates an assertion, and the log holds it exactly once.

mod common;

use serde_json::json;

#[tokio::test]
async fn post_then_duplicate_then_dump() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut server = common::Server::start(&data, &[]);
    let c = common::client();
    let body = common::assertion("drug:aspirin", "max_daily_dose_mg", json!("4 g"), "agent-1");
    let (st, _, first) = common::post_json(&c, &server.url("/v1/assertions"), &body).await;
    assert_eq!(st, 201, "{first}");
    assert_eq!(first["status"], "created");
    assert_eq!(first["position"], 1);
    let (st, _, dup) = common::post_json(&c, &server.url("/v1/assertions"), &body).await;
    assert_eq!(st, 200);
    assert_eq!(dup["status"], "duplicate");
    assert_eq!(dup["id"], first["id"]);
    assert_eq!(dup["position"], 1);
    assert!(server.terminate().success(), "clean exit on SIGTERM");
    let events = common::wal_dump(&data);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["position"], 1);
}
