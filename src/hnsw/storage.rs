//! [`PageStorage`]: the graph algorithms of `lorag_hnsw` over the index's pages.
//!
//! Reads take a share lock on one page at a time. What a search learns about an element when
//! it computes its distance (graph item, heap TID, flags) is remembered, so the neighbour list
//! can be read without visiting the element item again.

use super::buffers::RecentBuffers;
use super::page::*;
use lorag_hnsw::insert::select_neighbors;
use lorag_hnsw::{Candidate, Id, Metric, Params, Storage, StorageMut};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::VecDeque;
use lorag_hnsw::fxhash::IdMap;

pub struct PageStorage {
    pub index: pg_sys::Relation,
    pub dim: usize,
    pub params: Params,
    /// Inside CREATE INDEX: no WAL per change (see `WalRecord`).
    pub building: bool,
    seen: RefCell<IdMap<ElementHeader>>,
    buffers: RecentBuffers,
}

impl PageStorage {
    pub fn new(index: pg_sys::Relation, meta: &Meta) -> PageStorage {
        PageStorage { index, dim: meta.dim as usize, params: meta.params(), building: false, seen: RefCell::new(IdMap::with_capacity_and_hasher(4096, Default::default())), buffers: RecentBuffers::open(index) }
    }

    /// Pins and locks `block` (`BUFFER_LOCK_SHARE` or `BUFFER_LOCK_EXCLUSIVE`).
    fn read(&self, block: pg_sys::BlockNumber, lock: u32) -> PinnedBuffer {
        let mut buf = PinnedBuffer::pinned(self.buffers.pin(block));
        buf.lock(lock);
        buf
    }

    /// Calls `f` with the element item `id` under a share lock.
    fn with_element<R>(&self, id: Id, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let (block, offset) = unpack(id);
        let buf = self.read(block, pg_sys::BUFFER_LOCK_SHARE);
        // Safety: the page is locked while the slice is in use.
        let item = unsafe { item(buf.page(), offset) };
        let item = item.filter(|it| is_element(it, self.dim));
        f(item.map(|it| &*it))
    }

    /// The element's header, from the cache of this search or from its page.
    pub fn header(&self, id: Id) -> Option<ElementHeader> {
        if let Some(h) = self.seen.borrow().get(&id) {
            return Some(*h);
        }
        let h = self.with_element(id, |it| it.map(ElementHeader::parse))?;
        self.seen.borrow_mut().insert(id, h);
        Some(h)
    }

    /// Forgets cached headers (their flags may change between scan batches).
    pub fn forget(&self) {
        self.seen.borrow_mut().clear();
    }

    /// Calls `f` with the graph item `graph` under a lock of `lock` mode.
    fn with_graph<R>(&self, graph: Id, lock: u32, f: impl FnOnce(Option<&mut [u8]>) -> R) -> R {
        let (block, offset) = unpack(graph);
        let buf = self.read(block, lock);
        // Safety: the page is locked while the slice is in use.
        let item = unsafe { item(buf.page(), offset) }.filter(|it| it.first() == Some(&GRAPH_KIND));
        f(item)
    }

    /// Rewrites element `id`'s list at `level` with `compute(current list)`, atomically: the
    /// new list is computed without a lock (it may read other pages), then written under an
    /// exclusive lock only if the list did not change meanwhile; otherwise it is recomputed.
    fn update_list(&mut self, id: Id, level: usize, mut compute: impl FnMut(&Self, &[Id]) -> Option<Vec<Id>>) {
        let Some(h) = self.header(id) else { return };
        let m = self.params.m;
        for _attempt in 0..8 {
            let mut before = Vec::new();
            let readable = self.with_graph(h.graph, pg_sys::BUFFER_LOCK_SHARE, |g| {
                g.map(|g| GraphItem::neighbors(g, m, level, &mut before)).is_some()
            });
            if !readable || level > h.level {
                return;
            }
            let Some(after) = compute(self, &before) else { return };
            let (block, offset) = unpack(h.graph);
            let buf = self.read(block, pg_sys::BUFFER_LOCK_EXCLUSIVE);
            let mut now = Vec::new();
            // Safety: the page is exclusively locked.
            if let Some(g) = unsafe { item(buf.page(), offset) } {
                GraphItem::neighbors(g, m, level, &mut now);
            }
            if now != before {
                continue; // someone else changed the list: recompute from the new one
            }
            let mut wal = WalRecord::start(self.index, self.building);
            let page = wal.register(&buf, false);
            // Safety: the registered image of the locked page.
            if let Some(g) = unsafe { item(page, offset) } {
                GraphItem::set_neighbors(g, m, level, &after);
            }
            wal.finish();
            return;
        }
    }

    /// Writes the meta page with `update` applied.
    pub fn update_meta(&self, update: impl FnOnce(&mut Meta)) {
        let buf = PinnedBuffer::read(self.index, META_BLOCK, pg_sys::BUFFER_LOCK_EXCLUSIVE);
        let mut wal = WalRecord::start(self.index, self.building);
        let page = wal.register(&buf, false);
        // Safety: the registered image of the locked meta page.
        unsafe {
            let mut meta = *meta_mut(page);
            update(&mut meta);
            write_meta(page, meta);
        }
        wal.finish();
    }
}

impl Storage for PageStorage {
    fn metric(&self) -> Metric {
        self.params.metric
    }

    fn entry_point(&self) -> Option<(Id, usize)> {
        read_meta(self.index).entry_point()
    }

    fn with_vector<R>(&self, id: Id, f: impl FnOnce(&[f32]) -> R) -> R {
        let dim = self.dim;
        let mut f = Some(f);
        let mut header = None;
        let r = self.with_element(id, |it| {
            let it = it.expect("hnsw neighbour list points at a missing element");
            header = Some(ElementHeader::parse(it));
            (f.take().unwrap())(vector_of(it, dim))
        });
        if let Some(h) = header {
            self.seen.borrow_mut().insert(id, h);
        }
        r
    }

    fn distance(&self, query: &[f32], id: Id) -> f32 {
        let (dim, metric) = (self.dim, self.params.metric);
        let found = self.with_element(id, |it| it.map(|it| (ElementHeader::parse(it), metric.distance(query, vector_of(it, dim)))));
        match found {
            Some((h, d)) => {
                self.seen.borrow_mut().insert(id, h);
                d
            }
            // A dangling id (the element's slot was reused or never written): never close.
            None => f32::INFINITY,
        }
    }

    /// Overlaps the memory accesses of all the elements instead of adding them up: prefetches
    /// the buffer headers and line pointers of every element's page, then walks the elements
    /// with pinning (and prefetching the item) a few elements ahead of computing. At most
    /// `AHEAD + 1` pins are held, so they stay in the backend's fixed array of private pin
    /// counts (8 entries; beyond it every pin and unpin is a hash-table probe). Headers are
    /// remembered only for elements closer than `closer_than` (the others are read again in
    /// the rare case they are needed).
    fn distances(&self, query: &[f32], ids: &[Id], closer_than: f32, out: &mut Vec<f32>) {
        const AHEAD: usize = 5;
        out.clear();
        let (dim, metric) = (self.dim, self.params.metric);
        for &id in ids {
            let (block, offset) = unpack(id);
            self.buffers.prefetch(block, offset);
        }
        let mut pinned: VecDeque<(PinnedBuffer, pg_sys::OffsetNumber)> = VecDeque::with_capacity(AHEAD + 1);
        let mut seen = self.seen.borrow_mut();
        for i in 0..ids.len() + AHEAD {
            if let Some(&id) = ids.get(i) {
                let (block, offset) = unpack(id);
                let buf = PinnedBuffer::pinned(self.buffers.pin(block));
                prefetch_item(buf.page(), offset, element_size(dim));
                pinned.push_back((buf, offset));
            }
            let Some(j) = i.checked_sub(AHEAD) else { continue };
            let (mut buf, offset) = pinned.pop_front().expect("pinned AHEAD elements earlier");
            buf.lock(pg_sys::BUFFER_LOCK_SHARE);
            // Safety: the page is locked while the slice is in use.
            let it = unsafe { item(buf.page(), offset) }.filter(|it| is_element(it, dim));
            let d = match it {
                Some(it) => {
                    let d = metric.distance(query, vector_of(it, dim));
                    if d < closer_than {
                        seen.insert(ids[j], ElementHeader::parse(it));
                    }
                    d
                }
                None => f32::INFINITY,
            };
            out.push(d);
        }
    }

    fn neighbors(&self, id: Id, level: usize, out: &mut Vec<Id>) {
        out.clear();
        let Some(h) = self.header(id) else { return };
        if h.flags & FLAG_FREE != 0 {
            return;
        }
        let m = self.params.m;
        self.with_graph(h.graph, pg_sys::BUFFER_LOCK_SHARE, |g| {
            if let Some(g) = g {
                GraphItem::neighbors(g, m, level, out);
            }
        });
    }

    fn is_deleted(&self, id: Id) -> bool {
        self.header(id).is_none_or(|h| !h.is_live())
    }
}

impl StorageMut for PageStorage {
    fn set_neighbors(&mut self, id: Id, level: usize, neighbors: &[Id]) {
        let ids = neighbors.to_vec();
        self.update_list(id, level, |_, _| Some(ids.clone()));
    }

    fn set_entry_point(&mut self, entry: Option<(Id, usize)>) {
        self.update_meta(|meta| match entry {
            Some((id, level)) => {
                meta.entry = id;
                meta.entry_level = level as u32;
            }
            None => {
                meta.entry = NO_ID;
                meta.entry_level = 0;
            }
        });
    }

    fn add_back_link(&mut self, params: &Params, id: Id, level: usize, new: Id, distance: f32) {
        let params = *params;
        self.update_list(id, level, |s, current| {
            if current.contains(&new) {
                return None;
            }
            let max = params.max_neighbors(level);
            let mut ids = current.to_vec();
            if ids.len() < max {
                ids.push(new);
                return Some(ids);
            }
            let base = s.with_vector(id, |v| v.to_vec());
            let mut candidates: Vec<Candidate> = current
                .iter()
                .map(|&n| Candidate { id: n, distance: s.distance(&base, n) })
                .collect();
            candidates.push(Candidate { id: new, distance });
            candidates.sort();
            let kept = select_neighbors(s, &candidates, max);
            let kept: Vec<Id> = kept.iter().map(|c| c.id).collect();
            (kept != current).then_some(kept)
        });
    }
}

/// Asks the CPU to fetch item `offset` of a pinned page (read without a lock: a prefetch is only
/// a hint and cannot fault, and items of this index never move). Only on x86_64, as
/// [`super::buffers`]' prefetch.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn prefetch_item(page: pg_sys::Page, offset: pg_sys::OffsetNumber, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // Safety: the page is pinned, so its memory is valid; offsets are range-checked.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let header = page as *const pg_sys::PageHeaderData;
        let max = ((*header).pd_lower as usize).saturating_sub(size_of_page_header()) / 4;
        if offset == 0 || offset as usize > max {
            return;
        }
        let id = pg_sys::PageGetItemId(page, offset);
        let start = (page as *const u8).wrapping_add((*id).lp_off() as usize);
        for line in (0..len.min(pg_sys::BLCKSZ as usize)).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line) as *const i8);
        }
    }
}
