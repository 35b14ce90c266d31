//! Inserting an element: find its neighbours on every layer from its level down, choose them
//! with the heuristic of the HNSW paper (algorithm 4: keep a candidate only if it is closer to
//! the new element than to every neighbour already kept, which keeps edges pointing in diverse
//! directions), link both ways, and raise the entry point when the element is the highest.

use crate::search::{greedy, search_layer};
use crate::{Candidate, Id, Params, Storage, StorageMut, Visited};

/// The heuristic: from `candidates` sorted closest first, up to `m` diverse neighbours; when
/// fewer pass, the closest rejected ones fill the list (hnswlib's `keepPrunedConnections`).
pub fn select_neighbors<S: Storage + ?Sized>(s: &S, candidates: &[Candidate], m: usize) -> Vec<Candidate> {
    if candidates.len() <= m {
        return candidates.to_vec();
    }
    let mut kept: Vec<Candidate> = Vec::with_capacity(m);
    let mut kept_vectors: Vec<Vec<f32>> = Vec::with_capacity(m);
    let mut pruned = Vec::new();
    let metric = s.metric();
    for &c in candidates {
        if kept.len() >= m {
            break;
        }
        let diverse = s.with_vector(c.id, |v| {
            kept_vectors.iter().all(|k| metric.distance(v, k) > c.distance)
        });
        if diverse {
            kept.push(c);
            kept_vectors.push(s.with_vector(c.id, |v| v.to_vec()));
        } else {
            pruned.push(c);
        }
    }
    for c in pruned {
        if kept.len() >= m {
            break;
        }
        kept.push(c);
    }
    kept
}

/// Links element `id` (already stored, with `vector` and `level`) into the graph.
pub fn insert<S: StorageMut + ?Sized>(s: &mut S, params: &Params, id: Id, vector: &[f32], level: usize) {
    let Some((entry, top)) = s.entry_point() else {
        s.set_entry_point(Some((id, level)));
        return;
    };
    let mut cur = Candidate { id: entry, distance: s.distance(vector, entry) };
    let mut buf = Vec::new();
    for l in (level + 1..=top).rev() {
        cur = greedy(s, vector, cur, l, &mut buf);
    }
    let mut entries = vec![cur];
    for l in (0..=level.min(top)).rev() {
        let mut visited = Visited::default();
        visited.insert(id);
        let found = search_layer(s, vector, &entries, params.ef_construction, l, &mut visited);
        let live: Vec<Candidate> = found.iter().copied().filter(|c| c.id != id).collect();
        let neighbors = select_neighbors(s, &live, params.max_neighbors(l));
        let ids: Vec<Id> = neighbors.iter().map(|c| c.id).collect();
        s.set_neighbors(id, l, &ids);
        for n in &neighbors {
            s.add_back_link(params, n.id, l, id, n.distance);
        }
        if !found.is_empty() {
            entries = found;
        }
    }
    if level > top {
        s.set_entry_point(Some((id, level)));
    }
}
