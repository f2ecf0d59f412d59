//! Placement: which tenants a node of a fleet runs, decided from what
//! the store's copy of etcd holds, with no I/O here (the store executes
//! the claims and releases this plans).
//!
//! Keys below the prefix:
//! - `placement/<tenant>`: `{nodes: [a, b], labels: {region: eu},
//!   replicas: N}`, all optional. Without one a tenant runs on every node.
//!   `nodes` and `labels` say which nodes are eligible (both must hold when
//!   both are given; labels come from each node's document); without
//!   `replicas` the tenant runs on every eligible node.
//! - `owners/<tenant>/<slot>`: the node holding slot `0..replicas` of a
//!   tenant, put under that node's lease with a transaction that holds
//!   only if the key is absent: an election per slot. When the node dies
//!   its lease expires, the key goes, and the other eligible nodes race
//!   for it.
//! - `drain/<node>`: the node gives up what it holds and runs nothing from
//!   `tenants/` (`meshgatectl drain NODE`; `undrain` deletes the key).
//! - `status/<node>` (under the node's lease): the nodes alive.
//!
//! A free slot is claimed at once by the live eligible nodes that rank
//! first for the tenant (rendezvous hashing, so a dead node's tenants
//! spread over the others rather than all going to the fastest), and by
//! any eligible node once it has stayed free for [`GRACE`]. Nothing moves
//! back when a node returns: a tenant stays where it runs until that node
//! dies or drains.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long a free slot waits for the nodes that rank first before any
/// eligible node may take it.
pub const GRACE: Duration = Duration::from_secs(2);

/// The most replicas a placement may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// Where a tenant runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The nodes it may run on (default: any).
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// Labels a node must have (every one, with these values).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many eligible nodes run it (default: every one).
    #[serde(default)]
    pub replicas: Option<u32>,
}

impl Placement {
    /// Reads a `placement/<tenant>` document; the error names the key and
    /// what is expected.
    pub fn parse(value: serde_json::Value) -> Result<Placement, String> {
        let p: Placement = serde_json::from_value(value).map_err(|e| {
            format!("{e} (expected {{nodes: [NODE...], labels: {{KEY: VALUE}}, replicas: N}})")
        })?;
        if let Some(r) = p.replicas {
            if r == 0 || r > MAX_REPLICAS {
                return Err(format!(
                    "key `replicas`: {r}: expected 1 to {MAX_REPLICAS} (leave it out to run on every eligible node)"
                ));
            }
        }
        for n in p.nodes.iter().flatten() {
            crate::check_name(n).map_err(|e| format!("key `nodes`: {e}"))?;
        }
        Ok(p)
    }

    /// Whether a node with this name and these labels may run the tenant.
    pub fn admits(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        self.nodes
            .as_ref()
            .is_none_or(|n| n.iter().any(|x| x == node))
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|x| x == v))
    }
}

/// What the copy says about the fleet.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    /// Tenants with at least one document.
    pub tenants: BTreeSet<String>,
    /// Each tenant's placement (the last good one when its key is bad).
    pub placements: BTreeMap<String, Placement>,
    /// Tenants whose placement key is bad and that had no good one: they
    /// run nowhere until it is fixed.
    pub unplaced: BTreeSet<String>,
    /// Each node's labels (from its document).
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Nodes whose status key is held.
    pub alive: BTreeSet<String>,
    /// Nodes being drained.
    pub drained: BTreeSet<String>,
    /// tenant -> slot -> node holding it.
    pub owners: BTreeMap<String, BTreeMap<u32, String>>,
}

/// A change this node should make in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put `owners/<tenant>/<slot>` = this node if absent.
    Claim(String, u32),
    /// Delete `owners/<tenant>/<slot>` if it is this node's.
    Release(String, u32),
}

/// What one node runs and what it should change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The tenants this node runs now.
    pub visible: BTreeSet<String>,
    /// Claims and releases to make.
    pub actions: Vec<Action>,
}

/// A stable 64-bit hash (FNV-1a) of a tenant and a node: the same on
/// every node and every build.
fn score(tenant: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Remembers since when slots have been free (for [`GRACE`]).
#[derive(Debug, Default)]
pub struct Planner {
    free_since: HashMap<(String, u32), Instant>,
}

impl Planner {
    /// Decides for node `me` (labels from `fleet`). `leased`: this node
    /// holds a live lease; without one it runs no tenant with `replicas`
    /// (another node may hold it by now) and claims nothing.
    pub fn plan(&mut self, fleet: &Fleet, me: &str, leased: bool, now: Instant) -> Plan {
        let none = BTreeMap::new();
        let my_labels = fleet.labels.get(me).unwrap_or(&none);
        let draining = fleet.drained.contains(me);
        let mut plan = Plan::default();
        let mut still_free = HashMap::new();
        let blank = BTreeMap::new();
        // Slots held for tenants that no longer have documents.
        for (tenant, slots) in &fleet.owners {
            if !fleet.tenants.contains(tenant) {
                for (slot, owner) in slots {
                    if owner == me {
                        plan.actions.push(Action::Release(tenant.clone(), *slot));
                    }
                }
            }
        }
        for tenant in &fleet.tenants {
            if fleet.unplaced.contains(tenant) {
                continue;
            }
            let placement = fleet.placements.get(tenant);
            let eligible = !draining && placement.is_none_or(|p| p.admits(me, my_labels));
            let slots = fleet.owners.get(tenant).unwrap_or(&blank);
            let mine: Vec<u32> = slots
                .iter()
                .filter(|(_, n)| *n == me)
                .map(|(s, _)| *s)
                .collect();
            let Some(replicas) = placement.and_then(|p| p.replicas) else {
                if eligible {
                    plan.visible.insert(tenant.clone());
                }
                for s in mine {
                    plan.actions.push(Action::Release(tenant.clone(), s));
                }
                continue;
            };
            if !eligible {
                for s in mine {
                    plan.actions.push(Action::Release(tenant.clone(), s));
                }
                continue;
            }
            // Keep the lowest slot held within range, give up the rest.
            let keep = mine.iter().copied().find(|s| *s < replicas);
            for s in &mine {
                if Some(*s) != keep {
                    plan.actions.push(Action::Release(tenant.clone(), *s));
                }
            }
            if keep.is_some() {
                if leased {
                    plan.visible.insert(tenant.clone());
                }
                continue;
            }
            if !leased {
                continue;
            }
            let Some(free) = (0..replicas).find(|s| !slots.contains_key(s)) else {
                continue;
            };
            // Rank among the live eligible nodes that hold no slot of it.
            let holders: BTreeSet<&String> = slots.values().collect();
            let mut ranked: Vec<&str> = fleet
                .alive
                .iter()
                .filter(|n| *n == me || !holders.contains(n))
                .filter(|n| !fleet.drained.contains(*n))
                .filter(|n| {
                    placement.is_none_or(|p| p.admits(n, fleet.labels.get(*n).unwrap_or(&none)))
                })
                .map(String::as_str)
                .collect();
            if !ranked.contains(&me) {
                ranked.push(me);
            }
            ranked.sort_by_key(|n| std::cmp::Reverse(score(tenant, n)));
            let free_slots = (0..replicas).filter(|s| !slots.contains_key(s)).count();
            let rank = ranked.iter().position(|n| *n == me).unwrap_or(usize::MAX);
            let since = *self.free_since.get(&(tenant.clone(), free)).unwrap_or(&now);
            still_free.insert((tenant.clone(), free), since);
            if rank < free_slots || now.duration_since(since) >= GRACE {
                plan.actions.push(Action::Claim(tenant.clone(), free));
            }
        }
        self.free_since = still_free;
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(nodes: &[&str]) -> Fleet {
        Fleet {
            alive: nodes.iter().map(|n| n.to_string()).collect(),
            tenants: ["acme".to_string()].into(),
            ..Fleet::default()
        }
    }

    fn one() -> Placement {
        Placement {
            replicas: Some(1),
            ..Placement::default()
        }
    }

    #[test]
    fn parse_and_admit() {
        let p = Placement::parse(serde_json::json!({"labels": {"region": "eu"}, "replicas": 2}))
            .unwrap();
        let eu: BTreeMap<String, String> = [("region".into(), "eu".into())].into();
        assert!(p.admits("a", &eu));
        assert!(!p.admits("a", &BTreeMap::new()));
        let p = Placement::parse(serde_json::json!({"nodes": ["a"]})).unwrap();
        assert!(p.admits("a", &BTreeMap::new()) && !p.admits("b", &BTreeMap::new()));
        for bad in [
            serde_json::json!({"replicas": 0}),
            serde_json::json!({"replica": 1}),
            serde_json::json!({"nodes": "a"}),
            serde_json::json!({"nodes": ["../x"]}),
        ] {
            let e = Placement::parse(bad.clone()).unwrap_err();
            assert!(e.contains("replica") || e.contains("nodes"), "{bad}: {e}");
        }
    }

    #[test]
    fn without_placement_every_node_runs_it_and_a_drained_one_none() {
        let mut f = fleet(&["a", "b"]);
        let now = Instant::now();
        let p = Planner::default().plan(&f, "a", false, now);
        assert_eq!(p.visible, ["acme".to_string()].into());
        f.drained.insert("a".into());
        assert!(Planner::default()
            .plan(&f, "a", true, now)
            .visible
            .is_empty());
    }

    #[test]
    fn one_replica_is_claimed_by_the_first_ranked_node_then_by_anyone_after_the_grace() {
        let mut f = fleet(&["a", "b", "c"]);
        f.placements.insert("acme".into(), one());
        let now = Instant::now();
        let claims: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| {
                Planner::default()
                    .plan(&f, n, true, now)
                    .actions
                    .contains(&Action::Claim("acme".into(), 0))
            })
            .collect();
        assert_eq!(claims.len(), 1, "{claims:?}");
        let first = claims[0];
        // Another node waits for the first one, then claims.
        let other = ["a", "b", "c"].into_iter().find(|n| *n != first).unwrap();
        let mut planner = Planner::default();
        assert!(planner.plan(&f, other, true, now).actions.is_empty());
        let p = planner.plan(&f, other, true, now + GRACE);
        assert_eq!(p.actions, [Action::Claim("acme".into(), 0)]);
        // Not visible until the claim shows in the copy; then only there.
        assert!(p.visible.is_empty());
        f.owners
            .insert("acme".into(), [(0, other.to_string())].into());
        assert!(planner.plan(&f, other, true, now).visible.contains("acme"));
        assert!(planner.plan(&f, first, true, now).visible.is_empty());
        assert!(planner
            .plan(&f, first, true, now + GRACE * 2)
            .actions
            .is_empty());
        // Without a lease the holder stops running it.
        assert!(planner.plan(&f, other, false, now).visible.is_empty());
        // Drained: released.
        f.drained.insert(other.into());
        assert_eq!(
            planner.plan(&f, other, true, now).actions,
            [Action::Release("acme".into(), 0)]
        );
    }

    #[test]
    fn labels_and_nodes_limit_who_claims() {
        let mut f = fleet(&["a", "b"]);
        f.placements.insert(
            "acme".into(),
            Placement {
                labels: [("region".into(), "eu".into())].into(),
                ..one()
            },
        );
        f.labels
            .insert("b".into(), [("region".into(), "eu".into())].into());
        let now = Instant::now();
        assert!(Planner::default()
            .plan(&f, "a", true, now + GRACE)
            .actions
            .is_empty());
        assert_eq!(
            Planner::default().plan(&f, "b", true, now).actions,
            [Action::Claim("acme".into(), 0)]
        );
    }

    #[test]
    fn replicas_lowered_give_up_the_extra_slot_and_a_gone_tenant_its_slots() {
        let mut f = fleet(&["a", "b"]);
        f.placements.insert("acme".into(), one());
        f.owners.insert(
            "acme".into(),
            [(0, "b".to_string()), (1, "a".to_string())].into(),
        );
        let now = Instant::now();
        assert_eq!(
            Planner::default().plan(&f, "a", true, now).actions,
            [Action::Release("acme".into(), 1)]
        );
        f.tenants.clear();
        assert_eq!(
            Planner::default().plan(&f, "b", true, now).actions,
            [Action::Release("acme".into(), 0)]
        );
    }

    #[test]
    fn a_dead_nodes_tenants_spread() {
        let mut f = fleet(&["a", "b", "c"]);
        f.tenants = (0..300).map(|i| format!("t{i}")).collect();
        for t in &f.tenants {
            f.placements.insert(t.clone(), one());
        }
        let now = Instant::now();
        let mut got: BTreeMap<&str, usize> = BTreeMap::new();
        for n in ["a", "b", "c"] {
            got.insert(n, Planner::default().plan(&f, n, true, now).actions.len());
        }
        assert_eq!(got.values().sum::<usize>(), 300, "{got:?}");
        assert!(got.values().all(|c| *c > 60), "{got:?}");
    }
}
