//! Searching: greedy descent through the upper layers, best-first search with a bounded result
//! set (`ef`) on a layer, and [`Scan`], a layer-0 search that can resume for more results.

use crate::{Candidate, Id, Storage, Visited};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// From `entry`, moves to the closest neighbour at `level` until none is closer.
pub fn greedy<S: Storage + ?Sized>(s: &S, query: &[f32], mut entry: Candidate, level: usize, buf: &mut Vec<Id>) -> Candidate {
    loop {
        let mut improved = false;
        s.neighbors(entry.id, level, buf);
        for &n in buf.iter() {
            let d = s.distance(query, n);
            if d < entry.distance {
                entry = Candidate { id: n, distance: d };
                improved = true;
            }
        }
        if !improved {
            return entry;
        }
    }
}

/// The entry point, descended greedily to `level` (inclusive of the layers above it).
pub fn descend<S: Storage + ?Sized>(s: &S, query: &[f32], level: usize) -> Option<Candidate> {
    let (entry, top) = s.entry_point()?;
    let mut cur = Candidate { id: entry, distance: s.distance(query, entry) };
    let mut buf = Vec::new();
    for l in (level + 1..=top).rev() {
        cur = greedy(s, query, cur, l, &mut buf);
    }
    Some(cur)
}

/// Best-first search at `level` from `entries`, keeping the `ef` closest; sorted, closest first.
pub fn search_layer<S: Storage + ?Sized>(
    s: &S,
    query: &[f32],
    entries: &[Candidate],
    ef: usize,
    level: usize,
    visited: &mut Visited,
) -> Vec<Candidate> {
    let mut candidates: BinaryHeap<Reverse<Candidate>> = BinaryHeap::new();
    let mut results: BinaryHeap<Candidate> = BinaryHeap::new();
    for &e in entries {
        if visited.insert(e.id) {
            candidates.push(Reverse(e));
            results.push(e);
        }
    }
    while results.len() > ef {
        results.pop();
    }
    let mut buf = Vec::new();
    let mut fresh = Vec::new();
    let mut dists = Vec::new();
    while let Some(Reverse(c)) = candidates.pop() {
        if results.len() >= ef && c.distance > results.peek().map_or(f32::INFINITY, |w| w.distance) {
            break;
        }
        s.neighbors(c.id, level, &mut buf);
        fresh.clear();
        fresh.extend(buf.iter().copied().filter(|&n| visited.insert(n)));
        // Vectors are read from all over memory: let the storage overlap the accesses.
        let bound = if results.len() >= ef { results.peek().map_or(f32::INFINITY, |w| w.distance) } else { f32::INFINITY };
        s.distances(query, &fresh, bound, &mut dists);
        for (&n, &d) in fresh.iter().zip(&dists) {
            if results.len() < ef || d < results.peek().map_or(f32::INFINITY, |w| w.distance) {
                let cand = Candidate { id: n, distance: d };
                candidates.push(Reverse(cand));
                results.push(cand);
                if results.len() > ef {
                    results.pop();
                }
            }
        }
    }
    results.into_sorted_vec()
}

/// The `k` closest live elements to `query` (an exact-order list of at most `ef` candidates).
pub fn knn<S: Storage + ?Sized>(s: &S, query: &[f32], k: usize, ef: usize) -> Vec<Candidate> {
    let mut scan = Scan::new(s, query);
    let mut out = scan.next_batch(s, query, ef.max(k));
    out.truncate(k);
    out
}

/// A layer-0 search that hands out results in batches of `ef` and can resume: elements that
/// were evaluated but did not make a batch are kept, and the next batch starts from the best of
/// them, expanding the graph further. Batches are each sorted; across batches the order is
/// relaxed (pgvector's `hnsw.iterative_scan = relaxed_order`).
pub struct Scan {
    candidates: BinaryHeap<Reverse<Candidate>>,
    discarded: BinaryHeap<Reverse<Candidate>>,
    visited: Visited,
    started: bool,
    buf: Vec<Id>,
    fresh: Vec<Id>,
    dists: Vec<f32>,
}

impl Scan {
    pub fn new<S: Storage + ?Sized>(s: &S, query: &[f32]) -> Scan {
        let mut scan = Scan {
            candidates: BinaryHeap::new(),
            discarded: BinaryHeap::new(),
            visited: Visited::with_capacity(8192),
            started: false,
            buf: Vec::new(),
            fresh: Vec::new(),
            dists: Vec::new(),
        };
        if let Some(entry) = descend(s, query, 0) {
            scan.discarded.push(Reverse(entry));
            scan.visited.insert(entry.id);
        }
        scan
    }

    /// How many elements' distances were computed so far (for `hnsw.max_scan_tuples`).
    pub fn scanned(&self) -> usize {
        self.visited.len()
    }

    /// True when no element is left to return.
    pub fn exhausted(&self) -> bool {
        self.started && self.discarded.is_empty() && self.candidates.is_empty()
    }

    /// The next up-to-`ef` results, closest first; empty when the graph is exhausted.
    pub fn next_batch<S: Storage + ?Sized>(&mut self, s: &S, query: &[f32], ef: usize) -> Vec<Candidate> {
        self.started = true;
        let mut results: BinaryHeap<Candidate> = BinaryHeap::new();
        while results.len() < ef {
            let Some(Reverse(c)) = self.discarded.pop() else { break };
            results.push(c);
            // It may never have been expanded (it was not good enough when first seen).
            self.candidates.push(Reverse(c));
        }
        while let Some(&Reverse(c)) = self.candidates.peek() {
            let worst = results.peek().map_or(f32::INFINITY, |w| w.distance);
            if results.len() >= ef && c.distance > worst {
                break;
            }
            self.candidates.pop();
            s.neighbors(c.id, 0, &mut self.buf);
            self.fresh.clear();
            for &n in &self.buf {
                if self.visited.insert(n) {
                    self.fresh.push(n);
                }
            }
            let bound = if results.len() >= ef { worst } else { f32::INFINITY };
            s.distances(query, &self.fresh, bound, &mut self.dists);
            for (&n, &d) in self.fresh.iter().zip(&self.dists) {
                let cand = Candidate { id: n, distance: d };
                let worst = results.peek().map_or(f32::INFINITY, |w| w.distance);
                if results.len() < ef || cand.distance < worst {
                    self.candidates.push(Reverse(cand));
                    results.push(cand);
                    if results.len() > ef {
                        let out = results.pop().expect("non-empty");
                        self.discarded.push(Reverse(out));
                    }
                } else {
                    self.discarded.push(Reverse(cand));
                }
            }
        }
        results.into_sorted_vec()
    }
}
