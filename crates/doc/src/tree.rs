//! The revision tree of one document, kept flat: every known revision maps to its parent's id
//! (the parent sits at `pos - 1`). A node without a parent is a root: the first revision, or the
//! oldest one kept after stemming. Pure logic, no I/O.

use super::rev::Rev;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Id of the parent revision (at `pos - 1`), if it is known.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(rename = "d", default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// Whether the body of this revision is stored (leaves always; older ones until compaction).
    #[serde(rename = "b", default, skip_serializing_if = "is_false")]
    pub available: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, String, Node)>", into = "Vec<(u64, String, Node)>")]
pub struct RevTree {
    nodes: BTreeMap<(u64, String), Node>,
}

impl From<Vec<(u64, String, Node)>> for RevTree {
    fn from(v: Vec<(u64, String, Node)>) -> Self {
        RevTree {
            nodes: v.into_iter().map(|(p, i, n)| ((p, i), n)).collect(),
        }
    }
}

impl From<RevTree> for Vec<(u64, String, Node)> {
    fn from(t: RevTree) -> Self {
        t.nodes.into_iter().map(|((p, i), n)| (p, i, n)).collect()
    }
}

/// A leaf revision and whether it is a tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub rev: Rev,
    pub deleted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The path's newest revision was already known: nothing changed.
    Existing,
    /// The newest revision extends a leaf (or starts the tree).
    NewLeaf,
    /// The newest revision starts a new branch: a conflict.
    NewBranch,
}

impl RevTree {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn get(&self, rev: &Rev) -> Option<&Node> {
        self.nodes.get(&(rev.pos, rev.id.clone()))
    }

    pub fn contains(&self, rev: &Rev) -> bool {
        self.get(rev).is_some()
    }

    pub fn revs(&self) -> impl Iterator<Item = (Rev, &Node)> {
        self.nodes
            .iter()
            .map(|((p, i), n)| (Rev::new(*p, i.clone()), n))
    }

    fn non_leaves(&self) -> HashSet<(u64, &str)> {
        self.nodes
            .iter()
            .filter_map(|((p, _), n)| n.parent.as_deref().map(|par| (p - 1, par)))
            .collect()
    }

    /// All leaves, winner first, then by descending (not deleted, pos, id).
    pub fn leaves(&self) -> Vec<Leaf> {
        let inner = self.non_leaves();
        let mut leaves: Vec<Leaf> = self
            .nodes
            .iter()
            .filter(|((p, i), _)| !inner.contains(&(*p, i.as_str())))
            .map(|((p, i), n)| Leaf {
                rev: Rev::new(*p, i.clone()),
                deleted: n.deleted,
            })
            .collect();
        leaves.sort_by(|a, b| (!b.deleted, &b.rev).cmp(&(!a.deleted, &a.rev)));
        leaves
    }

    /// The leaves that are not deleted, winner first: more than one is a conflict.
    pub fn live_leaves(&self) -> Vec<Rev> {
        self.leaves()
            .into_iter()
            .filter(|l| !l.deleted)
            .map(|l| l.rev)
            .collect()
    }

    pub fn is_leaf(&self, rev: &Rev) -> bool {
        self.contains(rev)
            && !self
                .nodes
                .iter()
                .any(|((p, _), n)| *p == rev.pos + 1 && n.parent.as_deref() == Some(&rev.id))
    }

    /// The winning leaf: greatest (not deleted, pos, id).
    pub fn winner(&self) -> Option<Leaf> {
        self.leaves().into_iter().next()
    }

    /// Ids on the path from `rev` back to its root, newest first.
    pub fn path(&self, rev: &Rev) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = Some((rev.pos, rev.id.clone()));
        while let Some((p, id)) = cur {
            let Some(node) = self.nodes.get(&(p, id.clone())) else {
                break;
            };
            cur = node.parent.clone().map(|par| (p - 1, par));
            out.push(id);
            if p == 1 {
                break;
            }
        }
        out
    }

    /// Leaves descending from `rev` (including `rev` itself if it is a leaf).
    pub fn leaves_under(&self, rev: &Rev) -> Vec<Leaf> {
        self.leaves()
            .into_iter()
            .filter(|l| {
                l.rev.pos >= rev.pos && {
                    let path = self.path(&l.rev);
                    let idx = (l.rev.pos - rev.pos) as usize;
                    path.get(idx).map(|s| s == &rev.id).unwrap_or(false)
                }
            })
            .collect()
    }

    /// Merges a path (ids newest first, the newest at `start`). The newest revision gets the
    /// `deleted` flag and is marked available; older unknown ones are added as missing.
    pub fn merge_path(&mut self, start: u64, ids: &[String], deleted: bool) -> MergeOutcome {
        let Some(newest) = ids.first() else {
            return MergeOutcome::Existing;
        };
        if self.nodes.contains_key(&(start, newest.clone())) {
            // Known already; still learn about older history we did not have (stemmed roots).
            self.learn_ancestors(start, ids);
            return MergeOutcome::Existing;
        }
        let was_empty = self.nodes.is_empty();
        let parent_was_leaf = match ids.get(1) {
            Some(parent) if start > 1 => self.is_leaf(&Rev::new(start - 1, parent.clone())),
            _ => false,
        };
        self.nodes.insert(
            (start, newest.clone()),
            Node {
                parent: None,
                deleted,
                available: true,
            },
        );
        self.learn_ancestors(start, ids);
        if was_empty || parent_was_leaf {
            MergeOutcome::NewLeaf
        } else {
            MergeOutcome::NewBranch
        }
    }

    fn learn_ancestors(&mut self, start: u64, ids: &[String]) {
        for (i, id) in ids.iter().enumerate() {
            let pos = start - i as u64;
            if pos == 0 {
                break;
            }
            let parent = if pos > 1 {
                ids.get(i + 1).cloned()
            } else {
                None
            };
            let node = self.nodes.entry((pos, id.clone())).or_insert_with(|| Node {
                parent: None,
                deleted: false,
                available: false,
            });
            match (&node.parent, parent) {
                (None, Some(p)) => node.parent = Some(p),
                // Already linked (possibly to another id, from a hostile peer): keep what we had,
                // and stop, since the rest of this path is not ours.
                (Some(existing), Some(p)) if *existing != p => return,
                _ => {}
            }
        }
    }

    /// Keeps only the last `limit` revisions of every path from a leaf. Returns removed revs.
    pub fn stem(&mut self, limit: usize) -> Vec<Rev> {
        let limit = limit.max(1);
        // A revision survives when it is among the last `limit` of some leaf's path; links
        // between survivors stay, so branches that share history still share it.
        let mut keep: BTreeSet<(u64, String)> = BTreeSet::new();
        for leaf in self.leaves() {
            for (i, id) in self.path(&leaf.rev).into_iter().take(limit).enumerate() {
                keep.insert((leaf.rev.pos - i as u64, id));
            }
        }
        let removed: Vec<(u64, String)> = self
            .nodes
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in &removed {
            self.nodes.remove(k);
        }
        for ((p, _), n) in self.nodes.iter_mut() {
            if let Some(par) = &n.parent {
                if !keep.contains(&(p - 1, par.clone())) {
                    n.parent = None;
                }
            }
        }
        removed.into_iter().map(|(p, i)| Rev::new(p, i)).collect()
    }

    /// Marks a revision's body as no longer stored (compaction).
    pub fn set_unavailable(&mut self, rev: &Rev) {
        if let Some(n) = self.nodes.get_mut(&(rev.pos, rev.id.clone())) {
            n.available = false;
        }
    }

    /// For `_revs_diff`: leaves whose position is below the highest missing position.
    pub fn possible_ancestors(&self, missing: &[Rev]) -> Vec<Rev> {
        let Some(max) = missing.iter().map(|r| r.pos).max() else {
            return Vec::new();
        };
        let mut out: Vec<Rev> = self
            .leaves()
            .into_iter()
            .filter(|l| l.rev.pos < max)
            .map(|l| l.rev)
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn linear_history_and_winner() {
        let mut t = RevTree::default();
        assert_eq!(t.merge_path(1, &ids(&["a"]), false), MergeOutcome::NewLeaf);
        assert_eq!(
            t.merge_path(2, &ids(&["b", "a"]), false),
            MergeOutcome::NewLeaf
        );
        assert_eq!(
            t.merge_path(2, &ids(&["b", "a"]), false),
            MergeOutcome::Existing
        );
        assert_eq!(t.winner().unwrap().rev, Rev::new(2, "b"));
        assert_eq!(t.path(&Rev::new(2, "b")), ids(&["b", "a"]));
        // The first revision keeps its body until compaction.
        assert!(t.get(&Rev::new(1, "a")).unwrap().available);
    }

    #[test]
    fn conflicts_and_winner_rule() {
        let mut t = RevTree::default();
        t.merge_path(1, &ids(&["a"]), false);
        t.merge_path(2, &ids(&["b", "a"]), false);
        assert_eq!(
            t.merge_path(2, &ids(&["c", "a"]), false),
            MergeOutcome::NewBranch
        );
        assert_eq!(t.winner().unwrap().rev, Rev::new(2, "c"));
        // A deleted leaf loses against a live one even when it is longer.
        t.merge_path(3, &ids(&["z", "c", "a"]), true);
        assert_eq!(t.winner().unwrap().rev, Rev::new(2, "b"));
        let leaves = t.leaves();
        assert_eq!(leaves.len(), 2);
        assert!(leaves[1].deleted);
        // All deleted: the greatest deleted leaf wins.
        t.merge_path(3, &ids(&["y", "b", "a"]), true);
        assert_eq!(t.winner().unwrap().rev, Rev::new(3, "z"));
        assert!(t.winner().unwrap().deleted);
    }

    #[test]
    fn stemming_keeps_last_n_and_merges_overlap() {
        let mut t = RevTree::default();
        let all = ids(&["e", "d", "c", "b", "a"]);
        t.merge_path(5, &all, false);
        let removed = t.stem(3);
        assert_eq!(removed.len(), 2);
        assert_eq!(t.path(&Rev::new(5, "e")), ids(&["e", "d", "c"]));
        // A path starting before the stemmed root merges where it overlaps.
        assert_eq!(
            t.merge_path(6, &ids(&["f", "e", "d", "c", "b", "a"]), false),
            MergeOutcome::NewLeaf
        );
        t.stem(3);
        assert_eq!(t.path(&Rev::new(6, "f")), ids(&["f", "e", "d"]));
        assert_eq!(t.leaves().len(), 1);
    }

    #[test]
    fn leaves_under_and_possible_ancestors() {
        let mut t = RevTree::default();
        t.merge_path(2, &ids(&["b", "a"]), false);
        t.merge_path(3, &ids(&["c", "b", "a"]), false);
        t.merge_path(2, &ids(&["x", "a"]), false);
        let under: Vec<Rev> = t
            .leaves_under(&Rev::new(1, "a"))
            .into_iter()
            .map(|l| l.rev)
            .collect();
        assert_eq!(under.len(), 2);
        assert_eq!(t.leaves_under(&Rev::new(2, "b"))[0].rev, Rev::new(3, "c"));
        assert_eq!(
            t.possible_ancestors(&[Rev::new(3, "q")]),
            vec![Rev::new(2, "x")]
        );
        assert!(t.possible_ancestors(&[Rev::new(1, "q")]).is_empty());
    }

    #[test]
    fn serde_roundtrip() {
        let mut t = RevTree::default();
        t.merge_path(2, &ids(&["b", "a"]), true);
        let s = serde_json::to_string(&t).unwrap();
        let back: RevTree = serde_json::from_str(&s).unwrap();
        assert_eq!(t, back);
    }

    /// Random edit histories: a tree of revisions where each new one extends a random
    /// existing revision.
    fn histories() -> impl Strategy<Value = Vec<(usize, bool)>> {
        prop::collection::vec((0usize..1000, any::<bool>()), 1..25)
    }

    fn build_paths(spec: &[(usize, bool)]) -> Vec<(u64, Vec<String>, bool)> {
        // Node k has parent spec[k].0 % k (node 0 is the root).
        let mut paths: Vec<(u64, Vec<String>, bool)> = Vec::new();
        for (k, (par, del)) in spec.iter().enumerate() {
            let id = format!("r{k}");
            if k == 0 {
                paths.push((1, vec![id], *del));
            } else {
                let (ppos, pids, _) = paths[par % k].clone();
                let mut v = vec![id];
                v.extend(pids);
                paths.push((ppos + 1, v, *del));
            }
        }
        paths
    }

    proptest! {
        #[test]
        fn merge_is_order_independent(spec in histories(), seed in any::<u64>()) {
            let paths = build_paths(&spec);
            let mut a = RevTree::default();
            for (s, p, d) in &paths { a.merge_path(*s, p, *d); }
            let mut shuffled = paths.clone();
            // Deterministic shuffle from the seed.
            let n = shuffled.len();
            let mut x = seed | 1;
            for i in (1..n).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut b = RevTree::default();
            for (s, p, d) in &shuffled { b.merge_path(*s, p, *d); }
            // Same leaves and the same winner whatever the order (availability may differ).
            prop_assert_eq!(a.leaves(), b.leaves());
            prop_assert_eq!(a.winner(), b.winner());
            prop_assert_eq!(a.len(), b.len());
            // Merging everything again changes nothing.
            for (s, p, d) in &paths {
                prop_assert_eq!(b.merge_path(*s, p, *d), MergeOutcome::Existing);
            }
        }

        #[test]
        fn stemming_keeps_leaves_and_bounds_depth(spec in histories(), limit in 1usize..6) {
            let paths = build_paths(&spec);
            let mut t = RevTree::default();
            for (s, p, d) in &paths { t.merge_path(*s, p, *d); }
            let before = t.leaves();
            let windows: Vec<Vec<String>> = before
                .iter()
                .map(|l| t.path(&l.rev).into_iter().take(limit).collect())
                .collect();
            t.stem(limit);
            prop_assert_eq!(t.leaves(), before.clone());
            for (l, w) in before.iter().zip(&windows) {
                let after: Vec<String> = t.path(&l.rev).into_iter().take(limit).collect();
                prop_assert_eq!(&after, w);
            }
            // Nothing kept is further than `limit` from every leaf.
            for (r, _) in t.revs() {
                let near = before.iter().any(|l| {
                    l.rev.pos >= r.pos
                        && l.rev.pos - r.pos < limit as u64
                        && t.path(&l.rev).get((l.rev.pos - r.pos) as usize) == Some(&r.id)
                });
                prop_assert!(near, "{} kept but far from every leaf", r);
            }
            // Re-merging the full history of a leaf and stemming again is stable.
            for (s, p, d) in &paths { t.merge_path(*s, p, *d); }
            t.stem(limit);
            prop_assert_eq!(t.leaves(), before);
        }

        #[test]
        fn winner_is_max_of_leaves(spec in histories()) {
            let paths = build_paths(&spec);
            let mut t = RevTree::default();
            for (s, p, d) in &paths { t.merge_path(*s, p, *d); }
            let leaves = t.leaves();
            let w = t.winner().unwrap();
            for l in &leaves {
                prop_assert!((!w.deleted, &w.rev) >= (!l.deleted, &l.rev));
            }
        }
    }
}
