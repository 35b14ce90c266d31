//! HNSW graph algorithms (Malkov & Yashunin, 2016), generic over where the graph lives.
//!
//! * [`Storage`] / [`StorageMut`]: what the algorithms need from a graph. [`memory::MemoryGraph`]
//!   keeps it in RAM (index build, tests); `src/hnsw` in the extension maps it onto PostgreSQL pages.
//! * [`search`]: greedy descent through the upper layers, then a best-first search on layer 0,
//!   resumable for iterative scans (a filtered query keeps asking for more).
//! * [`insert`]: neighbour search at every layer of the new element, the selection heuristic,
//!   and back-links that prune a full neighbour list with the same heuristic.
//! * [`repair`]: after VACUUM marks elements deleted, the lists that pointed at them are refilled.
//!
//! Elements are dense `u32` ids. Distances are "smaller is closer": squared L2, negative inner
//! product, or `1 - a·b` on normalised vectors for cosine.

pub mod insert;
pub mod memory;
pub mod parallel;
pub mod repair;
pub mod rng;
pub mod fxhash;
pub mod search;
mod visited;

pub use visited::Visited;

use lorag_vector::kernels::kernels;
use std::cmp::Ordering;

pub const MIN_M: usize = 2;
pub const MAX_M: usize = 100;
pub const DEFAULT_M: usize = 16;
pub const MIN_EF_CONSTRUCTION: usize = 4;
pub const MAX_EF_CONSTRUCTION: usize = 1000;
pub const DEFAULT_EF_CONSTRUCTION: usize = 64;
pub const DEFAULT_EF_SEARCH: usize = 40;
/// An element's id: dense in memory, a packed (block, offset) on pages.
pub type Id = u64;

/// Levels above this are never drawn (probability m^-16: never, in practice).
pub const MAX_LEVEL: usize = 16;

/// The distance an index orders by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Squared Euclidean distance (same order as `<->`).
    L2,
    /// Negative inner product (`<#>`).
    InnerProduct,
    /// `1 - a·b` on vectors normalised when stored and when queried (same order as `<=>`).
    Cosine,
}

impl Metric {
    #[inline]
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        let k = kernels();
        match self {
            Metric::L2 => (k.l2_squared)(a, b),
            Metric::InnerProduct => -(k.dot)(a, b),
            Metric::Cosine => 1.0 - (k.dot)(a, b),
        }
    }

    /// Cosine vectors are stored normalised; `None` for a zero vector, which cannot be indexed.
    pub fn prepare(self, v: &[f32]) -> Option<Vec<f32>> {
        match self {
            Metric::Cosine => {
                let norm = lorag_vector::ops::norm(v);
                (norm > 0.0 && norm.is_finite()).then(|| v.iter().map(|&x| (x as f64 / norm) as f32).collect())
            }
            _ => Some(v.to_vec()),
        }
    }
}

/// Asks the CPU to bring the start of a vector into cache (a hint: it cannot fault); the
/// hardware prefetcher streams the rest once the first lines arrive. Elsewhere than x86_64 it
/// does nothing (stable Rust has no prefetch there).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn prefetch_slice(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..v.len().min(64)).step_by(16) {
        // Safety: the address is inside the slice, and a prefetch never faults anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(v.as_ptr().add(line) as *const i8) };
    }
}

/// Build and search parameters.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub m: usize,
    pub ef_construction: usize,
    pub metric: Metric,
}

impl Params {
    /// Neighbours kept per element at `level`: 2m on layer 0, m above.
    pub fn max_neighbors(&self, level: usize) -> usize {
        if level == 0 {
            2 * self.m
        } else {
            self.m
        }
    }

    /// The level of a new element from a uniform draw `u` in (0, 1]: floor(-ln(u) / ln(m)).
    pub fn level_for(&self, u: f64) -> usize {
        let ml = 1.0 / (self.m as f64).ln();
        ((-u.max(f64::MIN_POSITIVE).ln() * ml).floor() as usize).min(MAX_LEVEL)
    }
}

/// An element and its distance to the query at hand. Ordered by distance, then id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: Id,
    pub distance: f32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance.total_cmp(&other.distance).then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Candidate {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What the algorithms read from a graph. Page-backed storage reads under share locks; nothing
/// here assumes the graph stays still between calls (concurrent inserts only add edges).
pub trait Storage {
    fn metric(&self) -> Metric;
    /// The element searches start from, and its level.
    fn entry_point(&self) -> Option<(Id, usize)>;
    /// Calls `f` with element `id`'s vector (normalised for cosine).
    fn with_vector<R>(&self, id: Id, f: impl FnOnce(&[f32]) -> R) -> R;
    /// Element `id`'s neighbours at `level`, into `out` (cleared first).
    fn neighbors(&self, id: Id, level: usize, out: &mut Vec<Id>);
    /// Deleted elements still route searches until repaired but are never results.
    fn is_deleted(&self, id: Id) -> bool;

    /// A hint that `id`'s vector will be read soon (memory storage prefetches it into cache).
    fn prefetch(&self, _id: Id) {}

    fn distance(&self, query: &[f32], id: Id) -> f32 {
        let metric = self.metric();
        self.with_vector(id, |v| metric.distance(query, v))
    }

    /// Distances from `query` to each of `ids`, into `out`. Storage that can overlap the
    /// memory accesses of several elements (page storage pins them all, then prefetches)
    /// overrides this; the default prefetches two ahead. The caller keeps only elements
    /// closer than `closer_than`: storage may remember what it read about those alone.
    fn distances(&self, query: &[f32], ids: &[Id], closer_than: f32, out: &mut Vec<f32>) {
        let _ = closer_than;
        out.clear();
        for &n in ids.iter().take(2) {
            self.prefetch(n);
        }
        for (i, &n) in ids.iter().enumerate() {
            if let Some(&next) = ids.get(i + 2) {
                self.prefetch(next);
            }
            out.push(self.distance(query, n));
        }
    }

    fn distance_between(&self, a: Id, b: Id) -> f32 {
        let va = self.with_vector(a, |v| v.to_vec());
        self.distance(&va, b)
    }
}

/// What inserting and repairing write.
pub trait StorageMut: Storage {
    fn set_neighbors(&mut self, id: Id, level: usize, neighbors: &[Id]);
    /// Makes `(id, level)` the entry point; `None` when the graph has no live element left.
    fn set_entry_point(&mut self, entry: Option<(Id, usize)>);

    /// Adds `new` (at `distance` from `id`) to `id`'s list at `level`, pruning a full list with
    /// the selection heuristic. The default re-reads the list, as page storage must; storage
    /// that can lock the list overrides it to make the read-modify-write atomic.
    fn add_back_link(&mut self, params: &Params, id: Id, level: usize, new: Id, distance: f32) {
        let mut current = Vec::new();
        self.neighbors(id, level, &mut current);
        if current.contains(&new) {
            return;
        }
        let max = params.max_neighbors(level);
        if current.len() < max {
            current.push(new);
            self.set_neighbors(id, level, &current);
            return;
        }
        let mut candidates: Vec<Candidate> = current
            .iter()
            .map(|&n| Candidate { id: n, distance: self.distance_between(id, n) })
            .collect();
        candidates.push(Candidate { id: new, distance });
        candidates.sort();
        let kept = insert::select_neighbors(self, &candidates, max);
        let ids: Vec<Id> = kept.iter().map(|c| c.id).collect();
        self.set_neighbors(id, level, &ids);
    }
}

/// Seeded test data as the benchmarks use it: a Gaussian mixture (centres N(0,1) per dimension,
/// `per_centre` points each, noise N(0,1) added), L2-normalised.
pub mod testdata {
    pub use crate::rng::Rng;

    pub fn gaussian_mixture(n: usize, dim: usize, per_centre: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        let mut out = Vec::with_capacity(n);
        let mut centre: Vec<f64> = Vec::new();
        for i in 0..n {
            if i % per_centre == 0 {
                centre = (0..dim).map(|_| rng.normal()).collect();
            }
            let v: Vec<f64> = centre.iter().map(|c| c + rng.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            out.push(v.iter().map(|x| (x / norm) as f32).collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryGraph;
    use super::search::{knn, Scan};
    use super::testdata::{gaussian_mixture, Rng};
    use super::*;

    fn exact(data: &[Vec<f32>], q: &[f32], metric: Metric, k: usize) -> Vec<Id> {
        let mut all: Vec<Candidate> = data
            .iter()
            .enumerate()
            .map(|(i, v)| Candidate { id: i as Id, distance: metric.distance(q, v) })
            .collect();
        all.sort();
        all.iter().take(k).map(|c| c.id).collect()
    }

    fn build(data: &[Vec<f32>], metric: Metric) -> MemoryGraph {
        let params = Params { m: 16, ef_construction: 64, metric };
        let mut g = MemoryGraph::new(params, data[0].len());
        let mut rng = Rng::new(3);
        for v in data {
            let v = metric.prepare(v).unwrap();
            g.add(&v, params.level_for(rng.uniform()));
        }
        g
    }

    fn recall(g: &MemoryGraph, data: &[Vec<f32>], queries: &[Vec<f32>], ef: usize) -> f64 {
        let mut hits = 0;
        for q in queries {
            let q = g.params.metric.prepare(q).unwrap();
            let want = exact(data, &q, g.params.metric, 10);
            let got: Vec<Id> = knn(g, &q, 10, ef).iter().map(|c| c.id).collect();
            hits += got.iter().filter(|id| want.contains(id)).count();
        }
        hits as f64 / (10 * queries.len()) as f64
    }

    #[test]
    fn recall_on_a_gaussian_mixture() {
        let data = gaussian_mixture(5000, 64, 10, 1);
        let queries = gaussian_mixture(100, 64, 10, 2);
        for metric in [Metric::Cosine, Metric::L2, Metric::InnerProduct] {
            let g = build(&data, metric);
            let r = recall(&g, &data, &queries, 100);
            assert!(r >= 0.95, "{metric:?} recall {r}");
        }
    }

    #[test]
    fn lists_stay_within_bounds_and_point_at_real_elements() {
        let data = gaussian_mixture(2000, 16, 10, 5);
        let g = build(&data, Metric::L2);
        let mut buf = Vec::new();
        for id in 0..g.len() as Id {
            for l in 0..=g.level(id) {
                g.neighbors(id, l, &mut buf);
                assert!(buf.len() <= g.params.max_neighbors(l));
                assert!(!buf.contains(&id), "self loop at {id}");
                for &n in &buf {
                    assert!((n as usize) < g.len() && g.level(n) >= l, "bad edge {id}->{n} at {l}");
                }
                if g.len() > 1 {
                    assert!(!buf.is_empty() || l > 0, "element {id} has no neighbours on layer 0");
                }
            }
        }
    }

    #[test]
    fn resumable_scan_eventually_returns_every_element_once() {
        let data = gaussian_mixture(3000, 16, 10, 9);
        let g = build(&data, Metric::Cosine);
        let q = Metric::Cosine.prepare(&data[17]).unwrap();
        let mut scan = Scan::new(&g, &q);
        let mut seen = Visited::default();
        let mut total = 0;
        loop {
            let batch = scan.next_batch(&g, &q, 40);
            if batch.is_empty() {
                break;
            }
            assert!(batch.windows(2).all(|w| w[0] <= w[1]), "a batch is sorted");
            for c in batch {
                assert!(seen.insert(c.id), "{} returned twice", c.id);
                total += 1;
            }
        }
        assert_eq!(total, data.len(), "the iterative scan reaches the whole graph");
        assert_eq!(knn(&g, &q, 1, 40)[0].id, 17);
    }

    #[test]
    fn repair_after_deleting_a_third_keeps_recall_and_no_dangling_edges() {
        let data = gaussian_mixture(4000, 32, 10, 11);
        let mut g = build(&data, Metric::Cosine);
        for id in (0..data.len() as Id).filter(|i| i % 3 == 0) {
            g.mark_deleted(id);
        }
        // the entry point may be among them
        let elements: Vec<(Id, usize)> = (0..g.len() as Id).map(|i| (i, g.level(i))).collect();
        let params = g.params;
        repair::repair_all(&mut g, &params, &elements);
        let mut buf = Vec::new();
        for id in (0..g.len() as Id).filter(|i| i % 3 != 0) {
            for l in 0..=g.level(id) {
                g.neighbors(id, l, &mut buf);
                assert!(buf.iter().all(|&n| n % 3 != 0), "{id} still points at a deleted element");
            }
        }
        let (entry, _) = g.entry_point().unwrap();
        assert_ne!(entry % 3, 0);
        let live: Vec<Vec<f32>> = data.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, v)| v.clone()).collect();
        let ids: Vec<Id> = (0..data.len() as Id).filter(|i| i % 3 != 0).collect();
        let queries = gaussian_mixture(50, 32, 10, 12);
        let mut hits = 0;
        for q in &queries {
            let q = Metric::Cosine.prepare(q).unwrap();
            let want: Vec<Id> = exact(&live, &q, Metric::Cosine, 10).iter().map(|&i| ids[i as usize]).collect();
            let got: Vec<Id> = knn(&g, &q, 30, 80).into_iter().filter(|c| !g.is_deleted(c.id)).take(10).map(|c| c.id).collect();
            hits += got.iter().filter(|id| want.contains(id)).count();
        }
        let r = hits as f64 / (10 * queries.len()) as f64;
        assert!(r >= 0.9, "recall after repair {r}");
    }

    #[test]
    fn zero_vectors_cannot_be_prepared_for_cosine() {
        assert!(Metric::Cosine.prepare(&[0.0, 0.0]).is_none());
        assert_eq!(Metric::L2.prepare(&[0.0, 0.0]).unwrap(), vec![0.0, 0.0]);
        let n = Metric::Cosine.prepare(&[3.0, 4.0]).unwrap();
        assert!((n[0] - 0.6).abs() < 1e-7 && (n[1] - 0.8).abs() < 1e-7);
    }

    #[test]
    fn levels_follow_the_geometric_distribution() {
        let params = Params { m: 16, ef_construction: 64, metric: Metric::L2 };
        let mut rng = Rng::new(1);
        let n = 100_000;
        let above = (0..n).filter(|_| params.level_for(rng.uniform()) >= 1).count();
        let share = above as f64 / n as f64;
        assert!((share - 1.0 / 16.0).abs() < 0.005, "{share}");
    }
}

#[cfg(test)]
mod parallel_tests {
    use super::testdata::gaussian_mixture;
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn parallel_build_reaches_the_same_recall() {
        let data = gaussian_mixture(4000, 32, 10, 21);
        let params = Params { m: 16, ef_construction: 64, metric: Metric::Cosine };
        let mut rng = rng::Rng::new(5);
        let levels: Vec<usize> = data.iter().map(|_| params.level_for(rng.uniform())).collect();
        let flat: Vec<f32> = data.iter().flatten().copied().collect();
        let g = parallel::build(params, 32, flat, &levels, 4, &AtomicBool::new(false)).unwrap();
        assert_eq!(g.len(), data.len());
        let top = *levels.iter().max().unwrap();
        assert_eq!(g.entry_point().unwrap().1, top);
        let mut hits = 0;
        for (qi, q) in data.iter().enumerate().step_by(40) {
            let got = search::knn(&g, q, 10, 64);
            assert_eq!(got[0].id, qi as Id, "a point finds itself");
            let mut all: Vec<Candidate> =
                data.iter().enumerate().map(|(i, v)| Candidate { id: i as Id, distance: Metric::Cosine.distance(q, v) }).collect();
            all.sort();
            hits += got.iter().filter(|c| all[..10].iter().any(|w| w.id == c.id)).count();
        }
        assert!(hits as f64 / 1000.0 >= 0.95, "recall {}", hits as f64 / 1000.0);
        let cancelled = parallel::build(params, 32, vec![0.0; 32 * 10], &[0; 10], 2, &AtomicBool::new(true));
        assert!(cancelled.is_none());
    }
}
