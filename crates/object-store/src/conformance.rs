//! What every [`Blobs`] backend must do, as one suite that each backend's tests run on a fresh
//! store (or a fresh prefix).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;

use crate::{Blobs, ObjectInfo, ObjectStoreError};

/// Runs every check on `store`, which must be empty.
pub async fn run_all(store: Arc<dyn Blobs>) {
    create_if_absent_refuses_a_taken_key(&*store).await;
    racing_creates_have_one_winner(store.clone()).await;
    reads_ranges_and_lists_sorted_under_a_prefix(&*store).await;
    delete_is_idempotent_and_missing_keys_are_not_found(&*store).await;
}

pub async fn create_if_absent_refuses_a_taken_key(store: &dyn Blobs) {
    store
        .put_if_absent("c/one", Bytes::from_static(b"first"))
        .await
        .expect("create");
    let err = store
        .put_if_absent("c/one", Bytes::from_static(b"second"))
        .await
        .expect_err("a second create of the same key");
    assert!(
        matches!(err, ObjectStoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    assert_eq!(
        store.get("c/one").await.unwrap(),
        Bytes::from_static(b"first")
    );
    // A plain put overwrites.
    store
        .put("c/one", Bytes::from_static(b"third"))
        .await
        .unwrap();
    assert_eq!(
        store.get("c/one").await.unwrap(),
        Bytes::from_static(b"third")
    );
}

/// Eight creates of one key at once: exactly one wins (what fencing relies on).
pub async fn racing_creates_have_one_winner(store: Arc<dyn Blobs>) {
    for round in 0..3 {
        let key = format!("race/{round}");
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(
                    async move { store.put_if_absent(&key, Bytes::from(vec![i; 64])).await },
                )
            })
            .collect();
        let mut winners = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(()) => winners.push(i as u8),
                Err(ObjectStoreError::AlreadyExists { .. }) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(
            store.get(&key).await.unwrap(),
            Bytes::from(vec![winners[0]; 64])
        );
    }
}

pub async fn reads_ranges_and_lists_sorted_under_a_prefix(store: &dyn Blobs) {
    for k in ["l/b/2", "l/a/1", "l/b/10", "other/x"] {
        store
            .put_if_absent(k, Bytes::from(k.as_bytes().to_vec()))
            .await
            .unwrap();
    }
    let listed = store.list("l/").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        ["l/a/1", "l/b/10", "l/b/2"],
        "sorted by key, prefix only"
    );
    assert_eq!(
        store.list("l/b/").await.unwrap(),
        vec![
            ObjectInfo {
                key: "l/b/10".into(),
                size: 6
            },
            ObjectInfo {
                key: "l/b/2".into(),
                size: 5
            }
        ]
    );
    assert!(store.list("none/").await.unwrap().is_empty());
    assert_eq!(
        store.get_range("l/b/10", 2..4).await.unwrap(),
        Bytes::from_static(b"b/")
    );
}

pub async fn delete_is_idempotent_and_missing_keys_are_not_found(store: &dyn Blobs) {
    store
        .put_if_absent("d/k", Bytes::from_static(b"v"))
        .await
        .unwrap();
    store.delete("d/k").await.unwrap();
    store.delete("d/k").await.expect("deleting an absent key");
    let err = store.get("d/k").await.expect_err("deleted");
    assert!(
        matches!(err, ObjectStoreError::NotFound { .. }),
        "got {err:?}"
    );
    // A deleted key can be created again.
    store
        .put_if_absent("d/k", Bytes::from_static(b"w"))
        .await
        .unwrap();
}
