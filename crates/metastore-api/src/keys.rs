//! Every metastore key Walden uses, in one place (`docs/design.md` §3.5 lists them with their
//! values). Keys are `/`-separated under `walden/`; names inside them are validated before use
//! (pchannel, collection and node names never contain `/`).

/// Decimal ms: no tick with a physical part at or above it was handed out.
pub const TSO_UPPER_MS: &str = "walden/tso/upper_ms";

/// Decimal: the last term `pchannel` was assigned under. Checkpoints and every other write of a
/// pchannel's owner compare it with their term.
pub fn pchannel_term(pchannel: &str) -> String {
    format!("walden/pchannel/{pchannel}/term")
}

/// A pchannel's collection-state checkpoint, written only under its current term.
pub fn pchannel_checkpoint(pchannel: &str) -> String {
    format!("walden/pchannel/{pchannel}/checkpoint")
}

/// Prefix of every manifest (what delegators watch).
pub const MANIFESTS: &str = "walden/manifest/";

/// Prefix of one collection's manifest: one key per vchannel (its flushed segments, delete
/// logs and flushed-through position), written by the owner of the vchannel's pchannel under
/// its term.
pub fn manifest_prefix(collection_id: u64) -> String {
    format!("{MANIFESTS}{collection_id:020}/")
}

/// One vchannel's manifest.
pub fn manifest(collection_id: u64, vchannel: &str) -> String {
    format!("{}{vchannel}", manifest_prefix(collection_id))
}

/// Decimal: the last collection or broadcast id handed out.
pub const COORD_NEXT_ID: &str = "walden/coord/next_id";

/// Prefix of the collection catalog records.
pub const COLLECTION_PREFIX: &str = "walden/coord/collection/";

/// A collection's catalog record (also its pending DDL task).
pub fn collection(name: &str) -> String {
    format!("{COLLECTION_PREFIX}{name}")
}

/// Prefix of the collection aliases.
pub const ALIAS_PREFIX: &str = "walden/coord/alias/";

/// An alias: its value is the name of the collection it stands for.
pub fn alias(name: &str) -> String {
    format!("{ALIAS_PREFIX}{name}")
}

/// Prefix of the streaming nodes' registrations (each under its lease).
pub const NODE_PREFIX: &str = "walden/cluster/node/";

/// A streaming node's registration: its address and state, under its lease.
pub fn node(id: u64) -> String {
    format!("{NODE_PREFIX}{id:020}")
}

/// The node id of a registration key.
pub fn node_id(key: &str) -> Option<u64> {
    key.strip_prefix(NODE_PREFIX)?.parse().ok()
}

/// Decimal: the last node id handed out (a node takes a fresh id each time it starts).
pub const NODE_NEXT_ID: &str = "walden/cluster/node_next_id";

/// Prefix of the pchannel assignment records the coordinator keeps.
pub const ASSIGNMENT_PREFIX: &str = "walden/cluster/pchannel/";

/// A pchannel's assignment record: term, node, state, history.
pub fn assignment(pchannel: &str) -> String {
    format!("{ASSIGNMENT_PREFIX}{pchannel}")
}

/// The pchannel of an assignment record's key.
pub fn assignment_pchannel(key: &str) -> Option<&str> {
    key.strip_prefix(ASSIGNMENT_PREFIX)
}

/// The coordinator leader's key, under the leader's lease: its id and address.
pub const COORD_LEADER: &str = "walden/cluster/coord/leader";

/// Decimal: the last coordinator epoch handed out (each leadership takes a new one).
pub const COORD_EPOCH: &str = "walden/cluster/coord/epoch";

/// Prefix of the query nodes' registrations (each under its lease).
pub const QUERY_NODE_PREFIX: &str = "walden/querynode/";

/// A query node's registration: id, address, incarnation (`QueryNodeInfo`).
pub fn query_node(id: u64) -> String {
    format!("{QUERY_NODE_PREFIX}{id:020}")
}

/// Decimal: the last query node id handed out.
pub const QUERY_NODE_NEXT_ID: &str = "walden/querynode_next_id";

/// Prefix of the segment placements (what query nodes and delegators watch).
pub const PLACEMENT_PREFIX: &str = "walden/placement/";

/// A loaded collection's segment placement (`SegmentPlacement`), written by the leader
/// coordinator.
pub fn placement(collection_id: u64) -> String {
    format!("{PLACEMENT_PREFIX}{collection_id:020}")
}

/// Prefix of the read-replica records (what streaming nodes watch).
pub const REPLICAS_PREFIX: &str = "walden/replicas/";

/// A loaded collection's read replicas (`ReadReplicas`): extra delegators per vchannel on
/// other streaming nodes, written by the leader coordinator.
pub fn replicas(collection_id: u64) -> String {
    format!("{REPLICAS_PREFIX}{collection_id:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip_through_their_keys() {
        assert_eq!(node_id(&node(42)), Some(42));
        assert!(node(9) < node(10), "registrations list in id order");
        assert_eq!(assignment_pchannel(&assignment("dml-3")), Some("dml-3"));
        assert_eq!(node_id("walden/cluster/node/x"), None);
    }
}
