//! Source-range sets (`loadBalancerSourceRanges`): which set id each distinct list of ranges
//! has, and when a set is written and deleted.
//!
//! A set is shared by every frontend with the same ranges (usually all load-balancer frontends
//! of one Service), named by `ServiceEntry::source_ranges_id`. Ids are never reused by one
//! programmer, so a set's id always means the same ranges: changing a Service's ranges writes
//! a new set, points the frontends at it, and only then retires the old one. A retired set is
//! deleted by the sync after, so a packet that read the frontend's old entry an instant before
//! the switch still finds the old set (as tables wait a sync before reuse).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{maps::MAX_SOURCE_RANGES, service::ANY_SOURCE};

use super::apply::WritePlan;
use crate::{dataplane::MapContents, model::SourceRanges, translate::FrontendPlan};

#[derive(Debug)]
pub(super) struct RangeSets {
    /// Ranges -> id, for every set in the maps or registered for the sync under way.
    ids: HashMap<SourceRanges, u32>,
    /// Id -> ranges of the same sets.
    sets: BTreeMap<u32, SourceRanges>,
    /// Entries the registered sets hold together (what the map will hold at most).
    entries: usize,
    next_id: u32,
    /// Sets in the maps that no frontend named after the last sync: deleted by the next one.
    retired: BTreeSet<u32>,
    /// The map's capacity in entries.
    capacity: usize,
}

impl Default for RangeSets {
    fn default() -> Self {
        Self::adopt(&MapContents::default())
    }
}

impl RangeSets {
    /// Starts from the sets the maps hold (e.g. pinned by a previous run).
    pub fn adopt(programmed: &MapContents) -> Self {
        let mut sets = Self {
            ids: HashMap::new(),
            sets: BTreeMap::new(),
            entries: 0,
            next_id: 1,
            retired: BTreeSet::new(),
            capacity: MAX_SOURCE_RANGES as usize,
        };
        for (id, ranges) in &programmed.source_ranges {
            sets.insert(*id, ranges.clone());
        }
        sets.next_id = programmed.source_ranges.keys().max().map_or(1, |id| id + 1);
        // Sets no entry names were retired by an earlier run, long enough ago: the first sync
        // deletes them.
        let named: BTreeSet<u32> = (programmed.services.values())
            .map(|entry| entry.source_ranges_id)
            .collect();
        sets.retired = (programmed.source_ranges.keys())
            .filter(|id| !named.contains(id))
            .copied()
            .collect();
        sets
    }

    /// Another capacity (tests).
    #[cfg(test)]
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    fn insert(&mut self, id: u32, ranges: SourceRanges) {
        self.entries += ranges.len();
        self.ids.insert(ranges.clone(), id);
        self.sets.insert(id, ranges);
    }

    /// Gives the ranges of each plan a set id, while the map has room. A plan whose ranges find
    /// none cannot be programmed ([`RangeSets::id_for`] says `None`), like a table without room.
    pub fn register<'a>(&mut self, plans: impl IntoIterator<Item = &'a FrontendPlan>) {
        for plan in plans {
            let Some(ranges) = &plan.source_ranges else {
                continue;
            };
            if self.ids.contains_key(ranges) || self.entries + ranges.len() > self.capacity {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.insert(id, ranges.clone());
        }
    }

    /// The `source_ranges_id` a frontend with `plan` gets: [`ANY_SOURCE`] without ranges, `None`
    /// when its ranges found no room.
    pub fn id_for(&self, plan: &FrontendPlan) -> Option<u32> {
        match &plan.source_ranges {
            None => Some(ANY_SOURCE),
            Some(ranges) => self.ids.get(ranges).copied(),
        }
    }

    /// Adds to `plan` the sets its entries name that the maps lack (written before the
    /// entries), and the retired sets still unused (deleted last); retires the sets no entry
    /// names once `plan` is applied.
    pub fn plan_writes(&mut self, plan: &mut WritePlan, mirror: &MapContents) {
        let named_by_plan: BTreeSet<u32> = (plan.services.iter())
            .map(|(_, entry)| entry.source_ranges_id)
            .filter(|&id| id != ANY_SOURCE)
            .collect();
        for id in &named_by_plan {
            if !mirror.source_ranges.contains_key(id)
                && let Some(ranges) = self.sets.get(id)
            {
                plan.source_ranges.push((*id, ranges.clone()));
            }
        }
        if mirror.source_ranges.is_empty() {
            return; // nothing to retire or delete: the common case costs nothing
        }
        // The sets named once the plan is applied: by the entries it writes, and by the
        // programmed entries it neither rewrites nor removes.
        let rewritten: BTreeSet<_> = (plan.services.iter().map(|(key, _)| *key))
            .chain(plan.removed_services.iter().copied())
            .collect();
        let mut named = named_by_plan;
        named.extend(
            (mirror.services.iter())
                .filter(|(key, entry)| {
                    entry.source_ranges_id != ANY_SOURCE && !rewritten.contains(key)
                })
                .map(|(_, entry)| entry.source_ranges_id),
        );
        let mut retired = BTreeSet::new();
        for (id, ranges) in &mirror.source_ranges {
            if named.contains(id) {
                continue;
            }
            if self.retired.contains(id) {
                plan.removed_source_ranges.push((*id, ranges.clone()));
            } else {
                retired.insert(*id);
            }
        }
        self.retired = retired;
    }

    /// After a sync was applied: forgets the sets the maps do not hold (deleted, or registered
    /// for frontends that were not programmed).
    pub fn settle(&mut self, mirror: &MapContents) {
        let gone: Vec<u32> = (self.sets.keys())
            .filter(|id| !mirror.source_ranges.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let ranges = self.sets.remove(&id).expect("listed");
            self.ids.remove(&ranges);
            self.entries -= ranges.len();
        }
        self.retired
            .retain(|id| mirror.source_ranges.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSets;
    use crate::{
        dataplane::MapContents,
        manifest,
        sync::Programmer,
        translate::{NodeContext, translate},
    };

    fn load_balancer(name: &str, last_octet: u8, ranges: &[&str]) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{type: LoadBalancer, clusterIP: 10.96.0.{last_octet}, loadBalancerSourceRanges: [{}], ports: [{{port: 80}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: 192.168.50.{last_octet}}}]}}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n  - addresses: [\"10.244.0.1\"]\n---\n",
            ranges.join(", ")
        )
    }

    /// Ranges that find no room in the map leave their Service out whole (its ClusterIP
    /// too), in the full and the incremental diff, and it is programmed once room is freed.
    #[test]
    fn a_service_whose_ranges_find_no_room_is_left_out_whole() {
        let big = load_balancer("big", 2, &["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]);
        let small = load_balancer("small", 1, &["10.9.0.0/16"]);
        let desired = |yaml: &str| {
            let read = manifest::parse(yaml, "test");
            assert!(read.problems.is_empty(), "{:?}", read.problems);
            translate(&read.objects, &NodeContext::default())
        };
        for incremental in [false, true] {
            let mut programmer = Programmer {
                range_sets: RangeSets::default().with_capacity(3),
                ..Programmer::default()
            };
            let mut maps = MapContents::default();
            if incremental {
                programmer.sync(&desired(""), &mut maps).unwrap();
            }
            let (_, unplaced) = programmer
                .sync(&desired(&format!("{small}{big}")), &mut maps)
                .unwrap();
            let mut left_out: Vec<String> = unplaced.iter().map(|f| f.addr.to_string()).collect();
            left_out.sort();
            assert_eq!(left_out, ["10.96.0.2", "192.168.50.2"], "big, whole");
            assert_eq!(maps.services.len(), 2, "small's two frontends");
            assert_eq!(maps.source_ranges.len(), 1);
            // small goes: its set is retired for a sync, and deleted by the next, which frees
            // its room for the sync after (as a freed table range).
            for _ in 0..2 {
                let (_, unplaced) = programmer.sync(&desired(&big), &mut maps).unwrap();
                assert_eq!(unplaced.len(), 2, "the retired set still takes room");
            }
            let (_, unplaced) = programmer.sync(&desired(&big), &mut maps).unwrap();
            assert!(unplaced.is_empty(), "{unplaced:?}");
            assert_eq!(maps.services.len(), 2, "big's two frontends");
            assert_eq!(maps.source_ranges.values().next().unwrap().len(), 3);
        }
    }
}
