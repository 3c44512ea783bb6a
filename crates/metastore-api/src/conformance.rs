//! The conformance suite every metastore backend runs. `make` returns a handle on one store;
//! each check uses its own key prefix.

// Test support: a failed check panics with its message, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{Compare, EventKind, MetaError, MetaResult, MetaStore, Op, Txn};

pub async fn run_all<F: Fn() -> Arc<dyn MetaStore>>(make: F) {
    let store = make();
    revisions_count_every_change(&*store).await;
    range_returns_exactly_the_prefix_in_key_order(&*store).await;
    compare_and_swap_admits_exactly_one_writer(&*store).await;
    failed_txn_applies_its_failure_branch_only(&*store).await;
    relaxed_txn_has_the_semantics_of_txn(&*store).await;
    racing_increments_hand_out_each_number_once(&*store).await;
    watch_sees_later_changes_under_its_prefix_in_order(&*store).await;
    leased_keys_vanish_when_the_lease_expires_or_is_revoked(&*store).await;
}

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

pub async fn revisions_count_every_change(store: &dyn MetaStore) {
    assert_eq!(store.get("rev/a").await.unwrap(), None);
    let r1 = store.put("rev/a", b("1"), None).await.unwrap();
    let r2 = store.put("rev/a", b("2"), None).await.unwrap();
    assert!(r2 > r1);
    let kv = store.get("rev/a").await.unwrap().unwrap();
    assert_eq!(kv.value, b("2"));
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.version, 2);
    assert!(store.delete("rev/a").await.unwrap());
    assert!(
        !store.delete("rev/a").await.unwrap(),
        "second delete finds nothing"
    );
    let r3 = store.put("rev/a", b("3"), None).await.unwrap();
    let kv = store.get("rev/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.version),
        (r3, 1),
        "re-creation starts over"
    );
}

pub async fn range_returns_exactly_the_prefix_in_key_order(store: &dyn MetaStore) {
    for k in ["range/b", "range/a", "range/c/x", "rangex", "rang"] {
        store.put(k, b(k), None).await.unwrap();
    }
    let keys: Vec<_> = store
        .range("range/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["range/a", "range/b", "range/c/x"]);
    assert!(store.range("nothing/").await.unwrap().is_empty());
}

pub async fn compare_and_swap_admits_exactly_one_writer(store: &dyn MetaStore) {
    let create = |who: &str| Txn {
        compare: vec![Compare::absent("cas/owner")],
        success: vec![Op::Put {
            key: "cas/owner".into(),
            value: b(who),
            lease: None,
        }],
        failure: vec![],
    };
    assert!(store.txn(create("n1")).await.unwrap().succeeded);
    assert!(!store.txn(create("n2")).await.unwrap().succeeded);
    assert_eq!(
        store.get("cas/owner").await.unwrap().unwrap().value,
        b("n1")
    );

    let rev = store.get("cas/owner").await.unwrap().unwrap().mod_revision;
    let swap = |rev, who: &str| Txn {
        compare: vec![Compare::mod_revision("cas/owner", rev)],
        success: vec![Op::Put {
            key: "cas/owner".into(),
            value: b(who),
            lease: None,
        }],
        failure: vec![],
    };
    assert!(store.txn(swap(rev, "n3")).await.unwrap().succeeded);
    assert!(
        !store.txn(swap(rev, "n4")).await.unwrap().succeeded,
        "a stale revision loses"
    );
    assert_eq!(
        store.get("cas/owner").await.unwrap().unwrap().value,
        b("n3")
    );
}

pub async fn failed_txn_applies_its_failure_branch_only(store: &dyn MetaStore) {
    store.put("txn/x", b("1"), None).await.unwrap();
    let resp = store
        .txn(Txn {
            compare: vec![Compare::absent("txn/x")],
            success: vec![Op::Put {
                key: "txn/ok".into(),
                value: b("s"),
                lease: None,
            }],
            failure: vec![
                Op::Put {
                    key: "txn/fail".into(),
                    value: b("f"),
                    lease: None,
                },
                Op::Delete {
                    key: "txn/x".into(),
                },
            ],
        })
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(store.get("txn/ok").await.unwrap(), None);
    assert_eq!(store.get("txn/fail").await.unwrap().unwrap().value, b("f"));
    assert_eq!(store.get("txn/x").await.unwrap(), None);
    let fail = store.get("txn/fail").await.unwrap().unwrap();
    assert_eq!(fail.mod_revision, resp.revision, "one txn is one revision");
}

/// `increment` (built on compare-and-swap) gives every racing caller its own number.
pub async fn racing_increments_hand_out_each_number_once(store: &dyn MetaStore) {
    let all = futures::future::join_all((0..40).map(|_| crate::increment(store, "counter")))
        .await
        .into_iter()
        .collect::<MetaResult<std::collections::BTreeSet<u64>>>()
        .unwrap();
    assert_eq!(all, (1..=40).collect());
}

/// `txn_relaxed` differs from `txn` only in when it becomes durable.
pub async fn relaxed_txn_has_the_semantics_of_txn(store: &dyn MetaStore) {
    let put = |v: &str| Op::Put {
        key: "relaxed/k".into(),
        value: b(v),
        lease: None,
    };
    let first = store
        .txn_relaxed(Txn {
            compare: vec![Compare::absent("relaxed/k")],
            success: vec![put("1")],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(first.succeeded);
    let again = store
        .txn_relaxed(Txn {
            compare: vec![Compare::absent("relaxed/k")],
            success: vec![put("2")],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(!again.succeeded, "the compare is evaluated");
    let kv = store.get("relaxed/k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.mod_revision), (b("1"), first.revision));
}

pub async fn watch_sees_later_changes_under_its_prefix_in_order(store: &dyn MetaStore) {
    store.put("watch/before", b("0"), None).await.unwrap();
    let mut w = store.watch("watch/").await.unwrap();
    store.put("watch/a", b("1"), None).await.unwrap();
    store.put("other/a", b("x"), None).await.unwrap();
    store.put("watch/a", b("2"), None).await.unwrap();
    store.delete("watch/a").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .expect("watch event in time")
            .expect("watch open");
        got.push((e.kind, e.kv.key, e.kv.value, e.kv.mod_revision));
    }
    assert_eq!(got[0].0, EventKind::Put);
    assert_eq!(got[0].2, b("1"));
    assert_eq!(got[1].2, b("2"));
    assert_eq!(
        (got[2].0, got[2].1.as_str()),
        (EventKind::Delete, "watch/a")
    );
    assert!(got[0].3 < got[1].3 && got[1].3 < got[2].3, "revision order");
    assert!(
        w.try_recv().is_err(),
        "nothing outside the prefix or from before"
    );
}

pub async fn leased_keys_vanish_when_the_lease_expires_or_is_revoked(store: &dyn MetaStore) {
    // Keep-alives at a fifth of the TTL: a loaded machine cannot make the lease lapse early.
    let short = store
        .grant_lease(Duration::from_millis(1000))
        .await
        .unwrap();
    store.put("lease/a", b("1"), Some(short)).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        store.keep_alive(short).await.unwrap();
    }
    assert!(store.get("lease/a").await.unwrap().is_some(), "kept alive");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.get("lease/a").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lapsed = store.keep_alive(short).await;
    assert!(
        matches!(lapsed, Err(MetaError::LeaseNotFound(_))),
        "keep-alive of a lapsed lease: {lapsed:?}"
    );

    let long = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store.put("lease/b", b("1"), Some(long)).await.unwrap();
    store.revoke_lease(long).await.unwrap();
    assert_eq!(store.get("lease/b").await.unwrap(), None);
    assert!(matches!(
        store.put("lease/c", b("1"), Some(long)).await,
        Err(MetaError::LeaseNotFound(_))
    ));
}
