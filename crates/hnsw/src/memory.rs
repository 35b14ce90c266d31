//! The graph in RAM: used to build an index before it is written to pages, and by the tests.
//! Neighbour lists keep their distances so that back-links can be pruned without recomputing
//! the distance of every existing neighbour.

use crate::{Candidate, Id, Metric, Params, Storage, StorageMut};

pub struct MemoryGraph {
    pub params: Params,
    pub dim: usize,
    vectors: Vec<f32>,
    /// `links[id][level]`: neighbours with their distance to `id`.
    links: Vec<Vec<Vec<Candidate>>>,
    deleted: Vec<bool>,
    entry: Option<(Id, usize)>,
}

impl MemoryGraph {
    pub fn new(params: Params, dim: usize) -> Self {
        MemoryGraph { params, dim, vectors: Vec::new(), links: Vec::new(), deleted: Vec::new(), entry: None }
    }

    /// A graph built elsewhere (see [`crate::parallel`]).
    pub fn from_parts(params: Params, dim: usize, vectors: Vec<f32>, links: Vec<Vec<Vec<Candidate>>>, entry: Option<(Id, usize)>) -> Self {
        let deleted = vec![false; links.len()];
        MemoryGraph { params, dim, vectors, links, deleted, entry }
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn level(&self, id: Id) -> usize {
        self.links[id as usize].len() - 1
    }

    pub fn vector(&self, id: Id) -> &[f32] {
        let start = id as usize * self.dim;
        &self.vectors[start..start + self.dim]
    }

    pub fn neighbor_ids(&self, id: Id, level: usize) -> impl Iterator<Item = Id> + '_ {
        self.links[id as usize].get(level).into_iter().flatten().map(|c| c.id)
    }

    pub fn mark_deleted(&mut self, id: Id) {
        self.deleted[id as usize] = true;
    }

    /// Adds a prepared (normalised for cosine) vector at `level` and links it; returns its id.
    pub fn add(&mut self, vector: &[f32], level: usize) -> Id {
        assert_eq!(vector.len(), self.dim);
        let id = self.links.len() as Id;
        self.vectors.extend_from_slice(vector);
        self.links.push(vec![Vec::new(); level + 1]);
        self.deleted.push(false);
        let params = self.params;
        crate::insert::insert(self, &params, id, vector, level);
        id
    }
}

impl Storage for MemoryGraph {
    fn metric(&self) -> Metric {
        self.params.metric
    }

    fn entry_point(&self) -> Option<(Id, usize)> {
        self.entry
    }

    fn with_vector<R>(&self, id: Id, f: impl FnOnce(&[f32]) -> R) -> R {
        f(self.vector(id))
    }

    fn neighbors(&self, id: Id, level: usize, out: &mut Vec<Id>) {
        out.clear();
        out.extend(self.neighbor_ids(id, level));
    }

    fn is_deleted(&self, id: Id) -> bool {
        self.deleted[id as usize]
    }

    fn prefetch(&self, id: Id) {
        crate::prefetch_slice(self.vector(id));
    }

    fn distance_between(&self, a: Id, b: Id) -> f32 {
        self.params.metric.distance(self.vector(a), self.vector(b))
    }
}

impl StorageMut for MemoryGraph {
    fn set_neighbors(&mut self, id: Id, level: usize, neighbors: &[Id]) {
        let list: Vec<Candidate> = neighbors
            .iter()
            .map(|&n| Candidate { id: n, distance: self.distance_between(id, n) })
            .collect();
        self.links[id as usize][level] = list;
    }

    fn set_entry_point(&mut self, entry: Option<(Id, usize)>) {
        self.entry = entry;
    }

    fn add_back_link(&mut self, params: &Params, id: Id, level: usize, new: Id, distance: f32) {
        let mut list = std::mem::take(&mut self.links[id as usize][level]);
        crate::insert::link_into(self, &mut list, Candidate { id: new, distance }, params.max_neighbors(level));
        self.links[id as usize][level] = list;
    }
}
