use prost::Message as _;
use walden_message::MessageHeader;
use walden_proto::v1::{CollectionInfo, FlushInfo};

use super::*;

fn none() -> BTreeSet<u64> {
    BTreeSet::new()
}

fn policy() -> SealPolicy {
    SealPolicy {
        max_rows: u64::MAX,
        max_bytes: u64::MAX,
        idle_ms: u64::MAX,
        max_lifetime_ms: u64::MAX,
    }
}

fn header(t: MessageType, vc: &str, tick: u64, segment: u64, rows: u64) -> MessageHeader {
    MessageHeader {
        message_type: t as i32,
        vchannel: vc.into(),
        time_tick: TimeTick::compose(tick, 0).0,
        segment_id: segment,
        rows,
        partition: DEFAULT_PARTITION.into(),
        ..MessageHeader::default()
    }
}

/// Three vchannels with one growing segment each, of 100, 300 and 200 bytes.
fn three_segments() -> Shards {
    let mut s = Shards::new(policy());
    let schema = walden_schema::Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"e","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    for (i, bytes) in [100usize, 300, 200].into_iter().enumerate() {
        let vc = format!("v{i}");
        let info = CollectionInfo {
            collection_id: i as u64 + 1,
            schema: Some(schema.proto().clone()),
            ..CollectionInfo::default()
        };
        s.apply(
            &header(MessageType::CreateCollection, &vc, 1, 0, 0),
            &info.encode_to_vec(),
        );
        s.apply(
            &header(MessageType::CreateSegment, &vc, 2, 10 + i as u64, 0),
            &[],
        );
        s.apply(
            &header(MessageType::Insert, &vc, 3, 10 + i as u64, 1),
            &vec![0; bytes],
        );
    }
    s
}

fn sealed(flushes: &[MutableMessage]) -> Vec<(u64, String)> {
    flushes
        .iter()
        .flat_map(|m| {
            let f = FlushInfo::decode(m.payload.as_ref()).unwrap();
            f.segment_ids
                .into_iter()
                .map(move |id| (id, f.reason.clone()))
        })
        .collect()
}

#[test]
fn over_the_memory_high_mark_the_largest_segments_are_sealed_down_to_the_low_mark() {
    let s = three_segments();
    assert_eq!(s.growing_bytes(), 600);
    let now = TimeTick::compose(4, 0);
    assert!(
        s.due_seals(now, 600, (600, 100), &none()).is_empty(),
        "at the mark is not over it"
    );
    // 600 > 500: seal 300 (-> 300, still above 250), then 200 (-> 100).
    let due = sealed(&s.due_seals(now, 600, (500, 250), &none()));
    assert_eq!(due, [(11, "memory".to_owned()), (12, "memory".to_owned())]);
    // A segment an open transaction wrote into is skipped; the next largest goes instead.
    let busy = BTreeSet::from([11]);
    let due = sealed(&s.due_seals(now, 600, (500, 250), &busy));
    assert_eq!(due, [(12, "memory".to_owned()), (10, "memory".to_owned())]);
}

#[test]
fn a_flush_removes_segments_from_the_growing_total_and_remembers_them_as_sealed() {
    let mut s = three_segments();
    let flush = FlushInfo {
        segment_ids: vec![11],
        reason: "manual".into(),
    };
    s.apply(
        &header(MessageType::Flush, "v1", 5, 0, 0),
        &flush.encode_to_vec(),
    );
    assert_eq!(s.growing_bytes(), 300);
    assert_eq!(s.growing_segments(), 2);
    let cp = s.to_checkpoint();
    let back = Shards::from_checkpoint(&cp, policy()).unwrap();
    assert_eq!(back.to_checkpoint(), cp);
    assert_eq!(back.growing_bytes(), 300);
    let v1 = cp.vchannels.iter().find(|v| v.name == "v1").unwrap();
    assert_eq!(v1.sealed_segments, vec![11]);
}

#[test]
fn lifetime_and_idle_policies_use_the_ticks_of_the_log() {
    let s = Shards {
        policy: SealPolicy {
            idle_ms: 1_000,
            max_lifetime_ms: 5_000,
            ..policy()
        },
        ..three_segments()
    };
    // Created at 2 ms, last written at 3 ms.
    assert!(
        s.due_seals(TimeTick::compose(1_002, 0), 0, (u64::MAX, 0), &none())
            .is_empty()
    );
    let idle = sealed(&s.due_seals(TimeTick::compose(1_003, 0), 0, (u64::MAX, 0), &none()));
    assert_eq!(idle.len(), 3);
    assert!(idle.iter().all(|(_, r)| r == "idle"));
    let old = sealed(&s.due_seals(TimeTick::compose(5_002, 0), 0, (u64::MAX, 0), &none()));
    // Not vacuous: `all` over nothing holds.
    assert_eq!(old.len(), 3, "{old:?}");
    assert!(old.iter().all(|(_, r)| r == "lifetime"));
}
