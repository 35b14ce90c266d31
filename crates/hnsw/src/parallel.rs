//! Building a graph with several threads, as hnswlib does: every element's lists sit behind
//! their own lock, threads take elements from a shared counter, and the entry point changes
//! only to a higher level. A thread holds one list lock at a time, so there is no deadlock.
//! The threads run pure Rust on data they share read-only (the vectors): nothing here may call
//! into PostgreSQL, and the caller keeps the main thread for that.

use crate::insert::{insert, link_into, select_neighbors};
use crate::memory::MemoryGraph;
use crate::{Candidate, Id, Metric, Params, Storage, StorageMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

struct Shared<'a> {
    params: Params,
    dim: usize,
    vectors: &'a [f32],
    links: Vec<Vec<Mutex<Vec<Candidate>>>>,
    entry: Mutex<Option<(Id, usize)>>,
}

impl Shared<'_> {
    fn vector(&self, id: Id) -> &[f32] {
        let start = id as usize * self.dim;
        &self.vectors[start..start + self.dim]
    }
}

/// `&Shared` is what each thread mutates through (all mutation is behind locks).
struct Handle<'s, 'a>(&'s Shared<'a>);

impl Storage for Handle<'_, '_> {
    fn metric(&self) -> Metric {
        self.0.params.metric
    }

    fn entry_point(&self) -> Option<(Id, usize)> {
        *self.0.entry.lock().unwrap()
    }

    fn with_vector<R>(&self, id: Id, f: impl FnOnce(&[f32]) -> R) -> R {
        f(self.0.vector(id))
    }

    fn neighbors(&self, id: Id, level: usize, out: &mut Vec<Id>) {
        out.clear();
        if let Some(list) = self.0.links[id as usize].get(level) {
            out.extend(list.lock().unwrap().iter().map(|c| c.id));
        }
    }

    fn is_deleted(&self, _id: Id) -> bool {
        false
    }

    fn prefetch(&self, id: Id) {
        crate::prefetch_slice(self.0.vector(id));
    }

    fn distance_between(&self, a: Id, b: Id) -> f32 {
        self.0.params.metric.distance(self.0.vector(a), self.0.vector(b))
    }
}

impl StorageMut for Handle<'_, '_> {
    /// Only called for a new element's own lists. Another thread may already have linked
    /// back to it (it found the element through a higher layer): keep those edges too.
    fn set_neighbors(&mut self, id: Id, level: usize, neighbors: &[Id]) {
        let mut list: Vec<Candidate> =
            neighbors.iter().map(|&n| Candidate { id: n, distance: self.distance_between(id, n) }).collect();
        let mut current = self.0.links[id as usize][level].lock().unwrap();
        if !current.is_empty() {
            list.extend(current.iter().filter(|c| !neighbors.contains(&c.id)));
            list.sort();
            let max = self.0.params.max_neighbors(level);
            if list.len() > max {
                list = select_neighbors(&*self, &list, max);
            }
        }
        *current = list;
    }

    fn set_entry_point(&mut self, entry: Option<(Id, usize)>) {
        let mut cur = self.0.entry.lock().unwrap();
        match (*cur, entry) {
            (Some((_, top)), Some((_, level))) if level <= top => {}
            _ => *cur = entry,
        }
    }

    fn add_back_link(&mut self, params: &Params, id: Id, level: usize, new: Id, distance: f32) {
        let mut list = self.0.links[id as usize][level].lock().unwrap();
        link_into(&*self, &mut list, Candidate { id: new, distance }, params.max_neighbors(level));
    }
}

/// Builds the graph of `vectors` (`n * dim` floats, prepared for the metric) whose elements
/// have the given `levels`, with `threads` worker threads. The calling thread only waits,
/// calling `on_wait(elements inserted so far)` every few milliseconds: that is where a caller
/// checks for cancellation (setting `cancel`) and reports progress. Returns None when
/// cancelled.
pub fn build_with(
    params: Params,
    dim: usize,
    vectors: Vec<f32>,
    levels: &[usize],
    threads: usize,
    cancel: &AtomicBool,
    mut on_wait: impl FnMut(usize),
) -> Option<MemoryGraph> {
    let n = levels.len();
    assert_eq!(vectors.len(), n * dim);
    let shared = Shared {
        params,
        dim,
        vectors: &vectors,
        links: levels.iter().map(|&l| (0..=l).map(|_| Mutex::new(Vec::new())).collect()).collect(),
        entry: Mutex::new(None),
    };
    if n > 0 {
        Handle(&shared).set_entry_point(Some((0, levels[0])));
    }
    let next = AtomicUsize::new(1);
    let running = AtomicUsize::new(threads.max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                struct Done<'r>(&'r AtomicUsize);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::Release);
                    }
                }
                let _done = Done(&running);
                let mut handle = Handle(&shared);
                loop {
                    if cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let start = i * dim;
                    insert(&mut handle, &params, i as Id, &vectors[start..start + dim], levels[i]);
                }
            });
        }
        while running.load(Ordering::Acquire) > 0 {
            on_wait(next.load(Ordering::Relaxed).min(n));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
    if cancel.load(Ordering::Relaxed) {
        return None;
    }
    let entry = *shared.entry.lock().unwrap();
    let links = shared.links.into_iter().map(|l| l.into_iter().map(|m| m.into_inner().unwrap()).collect()).collect();
    Some(MemoryGraph::from_parts(params, dim, vectors, links, entry))
}


/// [`build_with`] without a waiting hook.
pub fn build(params: Params, dim: usize, vectors: Vec<f32>, levels: &[usize], threads: usize, cancel: &AtomicBool) -> Option<MemoryGraph> {
    build_with(params, dim, vectors, levels, threads, cancel, |_| {})
}
