//! Where pchannels go: a pure function of the current layout, so it is tested without a cluster.
//!
//! A node's load is the sum of its pchannels' weights (1 + the vchannels on the pchannel). The
//! plan first places what has no live owner (new, failed, or on a node that is gone or
//! draining) on the least loaded node, then moves pchannels from the most to the least loaded
//! node while that strictly narrows the gap. Ties go to the lower node id, so the plan is
//! deterministic.

use std::collections::BTreeMap;

/// One live node as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    pub draining: bool,
}

/// One pchannel as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PChannelView {
    pub name: String,
    /// The node it is on (assigned or being assigned), if that node is alive.
    pub node: Option<u64>,
    /// Whether it needs a (new) node now: unassigned, or failed with its backoff over.
    pub needs_node: bool,
    /// Whether it may move for balance (assigned and serving, no move in flight).
    pub movable: bool,
    pub weight: u64,
}

/// A decision: put `pchannel` on `node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub pchannel: String,
    pub node: u64,
    /// Planned (drain, balance) rather than a recovery of a pchannel with no owner.
    pub planned: bool,
}

/// The placements that take `pchannels` toward balance over `nodes`, at most `max_moves` of
/// them (recoveries first: a pchannel with no owner is down, a balance move is optional).
pub fn plan(nodes: &[NodeView], pchannels: &[PChannelView], max_moves: usize) -> Vec<Placement> {
    let targets: Vec<u64> = nodes.iter().filter(|n| !n.draining).map(|n| n.id).collect();
    if targets.is_empty() || max_moves == 0 {
        return Vec::new();
    }
    let draining: Vec<u64> = nodes.iter().filter(|n| n.draining).map(|n| n.id).collect();
    let mut load: BTreeMap<u64, u64> = targets.iter().map(|&id| (id, 0)).collect();
    for p in pchannels {
        if let Some(n) = p.node
            && !p.needs_node
            && let Some(l) = load.get_mut(&n)
        {
            *l += p.weight;
        }
    }
    let least = |load: &BTreeMap<u64, u64>| {
        load.iter()
            .min_by_key(|(id, l)| (**l, **id))
            .map(|(id, _)| *id)
    };
    let mut out = Vec::new();
    // Places each of `group` (heaviest first: the hardest to fit later) on the least loaded
    // node; false once the move bound is reached.
    let mut place = |mut group: Vec<&PChannelView>, planned: bool, out: &mut Vec<Placement>| {
        group.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.name.cmp(&b.name)));
        for p in group {
            if out.len() >= max_moves {
                return false;
            }
            let Some(to) = least(&load) else { break };
            *load.entry(to).or_default() += p.weight;
            out.push(Placement {
                pchannel: p.name.clone(),
                node: to,
                planned,
            });
        }
        true
    };
    // 1. Pchannels without a live owner; 2. pchannels on draining nodes.
    let orphans = pchannels
        .iter()
        .filter(|p| p.needs_node || p.node.is_none())
        .collect();
    let leaving = pchannels
        .iter()
        .filter(|p| p.movable && !p.needs_node && p.node.is_some_and(|n| draining.contains(&n)))
        .collect();
    if !place(orphans, false, &mut out) || !place(leaving, true, &mut out) {
        return out;
    }
    // 3. Balance: the lightest pchannel of the most loaded node moves to the least loaded one
    //    while that narrows the gap (load(from) - load(to) > weight).
    let mut placed: BTreeMap<u64, Vec<&PChannelView>> = BTreeMap::new();
    for p in pchannels {
        if p.movable
            && !p.needs_node
            && let Some(n) = p.node
            && load.contains_key(&n)
        {
            placed.entry(n).or_default().push(p);
        }
    }
    while out.len() < max_moves {
        let Some((&from, &from_load)) = load
            .iter()
            .max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id)))
        else {
            break;
        };
        let Some(to) = least(&load) else { break };
        let to_load = load[&to];
        let Some(candidates) = placed.get_mut(&from) else {
            break;
        };
        candidates.sort_by(|a, b| a.weight.cmp(&b.weight).then_with(|| a.name.cmp(&b.name)));
        let Some(pos) = candidates
            .iter()
            .position(|p| from_load - to_load > p.weight)
        else {
            break;
        };
        let p = candidates.remove(pos);
        *load.entry(from).or_default() -= p.weight;
        *load.entry(to).or_default() += p.weight;
        out.push(Placement {
            pchannel: p.name.clone(),
            node: to,
            planned: true,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[u64]) -> Vec<NodeView> {
        ids.iter()
            .map(|&id| NodeView {
                id,
                draining: false,
            })
            .collect()
    }

    fn on(name: &str, node: Option<u64>, weight: u64) -> PChannelView {
        PChannelView {
            name: name.into(),
            node,
            needs_node: node.is_none(),
            movable: node.is_some(),
            weight,
        }
    }

    fn loads(nodes: &[NodeView], ps: &[PChannelView], plan: &[Placement]) -> BTreeMap<u64, u64> {
        let mut l: BTreeMap<u64, u64> = nodes.iter().map(|n| (n.id, 0)).collect();
        for p in ps {
            let node = plan
                .iter()
                .find(|x| x.pchannel == p.name)
                .map(|x| x.node)
                .or(p.node);
            if let Some(n) = node {
                *l.entry(n).or_default() += p.weight;
            }
        }
        l
    }

    #[test]
    fn a_cold_start_spreads_pchannels_evenly_in_one_plan() {
        let n = nodes(&[1, 2, 3]);
        let ps: Vec<_> = (0..16).map(|i| on(&format!("p{i:02}"), None, 1)).collect();
        let plan = plan(&n, &ps, 1_000);
        assert_eq!(
            plan.len(),
            16,
            "every pchannel placed at once, not one by one"
        );
        let l = loads(&n, &ps, &plan);
        let (min, max) = (l.values().min().unwrap(), l.values().max().unwrap());
        assert!(max - min <= 1, "{l:?}");
        assert!(plan.iter().all(|p| !p.planned));
    }

    #[test]
    fn a_dead_nodes_pchannels_go_to_the_least_loaded_live_nodes_and_nothing_else_moves() {
        let n = nodes(&[1, 2]);
        let ps = vec![
            on("a", Some(1), 1),
            on("b", Some(2), 1),
            on("c", None, 1), // was on node 3, which died
            on("d", None, 1),
        ];
        let plan = plan(&n, &ps, 10);
        let mut moved: Vec<_> = plan.iter().map(|p| p.pchannel.as_str()).collect();
        moved.sort();
        assert_eq!(moved, ["c", "d"]);
        let l = loads(&n, &ps, &plan);
        assert_eq!(l[&1], 2);
        assert_eq!(l[&2], 2);
    }

    #[test]
    fn a_draining_node_is_emptied_and_a_new_node_gets_a_fair_share() {
        let mut n = nodes(&[1, 2, 3]);
        n[0].draining = true;
        let ps: Vec<_> = (0..6)
            .map(|i| on(&format!("p{i}"), Some(1 + (i % 2)), 1))
            .collect();
        let plan = plan(&n, &ps, 10);
        let l = loads(&n, &ps, &plan);
        assert_eq!(l.get(&1).copied().unwrap_or(0), 0, "{l:?}");
        assert_eq!((l[&2], l[&3]), (3, 3), "{l:?}");
    }

    #[test]
    fn weights_count_vchannels_and_a_balanced_layout_stays_put() {
        let n = nodes(&[1, 2]);
        // One heavy pchannel on node 1 balances three light ones on node 2.
        let ps = vec![
            on("heavy", Some(1), 3),
            on("l1", Some(2), 1),
            on("l2", Some(2), 1),
            on("l3", Some(2), 1),
        ];
        assert!(plan(&n, &ps, 10).is_empty(), "no move can narrow the gap");
        let skewed = vec![
            on("heavy", Some(1), 3),
            on("l1", Some(1), 1),
            on("l2", Some(1), 1),
            on("l3", Some(1), 1),
        ];
        let p = plan(&n, &skewed, 10);
        let l = loads(&n, &skewed, &p);
        assert_eq!((l[&1], l[&2]), (3, 3), "{p:?}");
    }

    #[test]
    fn the_move_bound_is_kept_and_recoveries_come_first() {
        let n = nodes(&[1, 2]);
        let mut ps: Vec<_> = (0..8).map(|i| on(&format!("b{i}"), Some(1), 1)).collect();
        ps.push(on("orphan", None, 1));
        let plan = plan(&n, &ps, 2);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].pchannel, "orphan");
        assert!(!plan[0].planned && plan[1].planned);
    }
}
