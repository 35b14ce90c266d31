//! Graph repair after deletions. Every live element whose list at some level points at a
//! deleted element gets a new list, chosen with the heuristic from its live neighbours and the
//! live neighbours of the deleted ones (two hops), so the region stays connected. A deleted
//! entry point is replaced by the live element with the highest level.

use crate::insert::select_neighbors;
use crate::{Candidate, Id, Params, StorageMut};

/// Repairs `id`'s lists; returns true when one changed. `level` is the element's level.
pub fn repair_element<S: StorageMut + ?Sized>(s: &mut S, params: &Params, id: Id, level: usize) -> bool {
    let mut changed = false;
    let mut list = Vec::new();
    let mut second = Vec::new();
    for l in 0..=level {
        s.neighbors(id, l, &mut list);
        if !list.iter().any(|&n| s.is_deleted(n)) {
            continue;
        }
        let mut pool: Vec<Id> = Vec::new();
        for &n in &list {
            if !s.is_deleted(n) {
                pool.push(n);
            } else {
                s.neighbors(n, l, &mut second);
                pool.extend(second.iter().copied().filter(|&x| x != id && !s.is_deleted(x)));
            }
        }
        pool.sort_unstable();
        pool.dedup();
        let query = s.with_vector(id, |v| v.to_vec());
        let mut candidates: Vec<Candidate> =
            pool.iter().map(|&n| Candidate { id: n, distance: s.distance(&query, n) }).collect();
        candidates.sort();
        let kept = select_neighbors(s, &candidates, params.max_neighbors(l));
        let ids: Vec<Id> = kept.iter().map(|c| c.id).collect();
        s.set_neighbors(id, l, &ids);
        changed = true;
    }
    changed
}

/// Repairs every live element in `elements` (ids with their levels), then the entry point.
pub fn repair_all<S: StorageMut + ?Sized>(s: &mut S, params: &Params, elements: &[(Id, usize)]) {
    for &(id, level) in elements {
        if !s.is_deleted(id) {
            repair_element(s, params, id, level);
        }
    }
    if let Some((entry, _)) = s.entry_point() {
        if s.is_deleted(entry) {
            let best = elements.iter().filter(|(id, _)| !s.is_deleted(*id)).max_by_key(|(_, l)| *l);
            s.set_entry_point(best.copied());
        }
    }
}
