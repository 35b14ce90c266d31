//! `aminsert`: one new element, linked into the live graph.
//!
//! The element and its (empty) graph item are written first, then the graph is searched and
//! the lists updated through [`PageStorage`], one page lock at a time. The heavyweight
//! `UPDATE_LOCK` is taken in share mode, or exclusive when the element may become the entry
//! point; VACUUM's repair takes it exclusively, so it never sees a half-linked element.
//! A FREE slot left by VACUUM is reused before the relation grows.

use super::page::*;
use super::storage::PageStorage;
use super::{check_dimensions, TagLock, UPDATE_LOCK};
use crate::vector::VectorRef;
use lorag_hnsw::rng::Rng;
use lorag_hnsw::Id;
use pgrx::{pg_guard, pg_sys};
use std::cell::RefCell;

thread_local! {
    static RNG: RefCell<Rng> = RefCell::new(Rng::new(
        std::process::id() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    ));
}

#[pg_guard]
pub unsafe extern "C-unwind" fn aminsert(
    index: pg_sys::Relation,
    values: *mut pg_sys::Datum,
    isnull: *mut bool,
    heap_tid: pg_sys::ItemPointer,
    _heap: pg_sys::Relation,
    _check_unique: pg_sys::IndexUniqueCheck::Type,
    _index_unchanged: bool,
    _index_info: *mut pg_sys::IndexInfo,
) -> bool {
    // Safety: one key column; PostgreSQL passes valid pointers.
    unsafe {
        if *isnull {
            return false;
        }
        let v = VectorRef::from_datum(*values);
        insert_vector(index, v.as_slice(), *heap_tid, false);
    }
    false
}

/// Inserts one vector. `building`: called from CREATE INDEX after the in-memory graph spilled.
pub fn insert_vector(index: pg_sys::Relation, v: &[f32], heap_tid: pg_sys::ItemPointerData, building: bool) {
    let mut meta = read_meta(index);
    if meta.dim == 0 {
        // An index on a column without typmod, built empty: the first vector decides.
        check_dimensions(v.len(), 0);
        let storage = PageStorage::new(index, &meta);
        let dim = v.len() as u32;
        storage.update_meta(|m| {
            if m.dim == 0 {
                m.dim = dim;
            }
        });
        meta = read_meta(index);
    }
    check_dimensions(v.len(), meta.dim as usize);
    let params = meta.params();
    let Some(prepared) = params.metric.prepare(v) else {
        return; // a zero vector has no cosine direction: not indexed
    };
    let wanted = params.level_for(RNG.with(|r| r.borrow_mut().uniform())).min(max_level(params.m));
    let may_become_entry = meta.entry_point().is_none_or(|(_, top)| wanted > top);
    let _update = TagLock::take(index, UPDATE_LOCK, if may_become_entry { pg_sys::ExclusiveLock } else { pg_sys::ShareLock });
    let mut storage = PageStorage::new(index, &meta);
    storage.building = building;
    let (id, level) = allocate(&storage, &meta, heap_tid, wanted, &prepared);
    lorag_hnsw::insert::insert(&mut storage, &params, id, &prepared, level);
}

/// Writes the new element and its empty graph item; returns its id and level (which may be
/// lowered to fit a reused slot).
fn allocate(s: &PageStorage, meta: &Meta, heap_tid: pg_sys::ItemPointerData, level: usize, v: &[f32]) -> (Id, usize) {
    if let Some(found) = reuse_free_slot(s, meta, heap_tid, level, v) {
        return found;
    }
    let graph = place_item(s, &GraphItem::empty(s.params.m, level));
    let header = ElementHeader { heap_tid, level, flags: 0, graph };
    (place_item(s, &element_bytes(header, v)), level)
}

/// Adds an item on the insert page, or on a new page when it is full.
fn place_item(s: &PageStorage, bytes: &[u8]) -> Id {
    let meta = read_meta(s.index);
    if meta.insert_block != pg_sys::InvalidBlockNumber && meta.insert_block < number_of_blocks(s.index) {
        let buf = PinnedBuffer::read(s.index, meta.insert_block, pg_sys::BUFFER_LOCK_EXCLUSIVE);
        // Safety: the locked page.
        if unsafe { free_space(buf.page()) } >= item_cost(bytes.len()) {
            let mut wal = WalRecord::start(s.index, s.building);
            let page = wal.register(&buf, false);
            // Safety: the registered image; the room was checked.
            let off = unsafe { add_item(page, bytes) }.expect("room was checked");
            wal.finish();
            return pack(buf.block(), off);
        }
    }
    let buf = PinnedBuffer::extend(s.index, pg_sys::ForkNumber::MAIN_FORKNUM, !s.building);
    let block = buf.block();
    let mut wal = WalRecord::start(s.index, s.building);
    let page = wal.register(&buf, true);
    // Safety: the registered image of a new page.
    let off = unsafe {
        init_page(page, PAGE_DATA);
        add_item(page, bytes)
    }
    .expect("an item always fits on an empty page");
    wal.finish();
    drop(buf);
    s.update_meta(|m| m.insert_block = block);
    pack(block, off)
}

/// Reuses an element slot VACUUM freed, with its graph item (level capped at the slot's).
fn reuse_free_slot(s: &PageStorage, meta: &Meta, heap_tid: pg_sys::ItemPointerData, level: usize, v: &[f32]) -> Option<(Id, usize)> {
    if meta.free_block == pg_sys::InvalidBlockNumber {
        return None;
    }
    let nblocks = number_of_blocks(s.index);
    for block in meta.free_block..nblocks.min(meta.free_block.saturating_add(8)) {
        let buf = PinnedBuffer::read(s.index, block, pg_sys::BUFFER_LOCK_EXCLUSIVE);
        let page = buf.page();
        // Safety: the locked page.
        let max = unsafe { pg_sys::PageGetMaxOffsetNumber(page) };
        for off in 1..=max {
            // Safety: the locked page.
            let Some(it) = (unsafe { item(page, off) }) else { continue };
            if !is_element(it, s.dim) {
                continue;
            }
            let old = ElementHeader::parse(it);
            if old.flags & FLAG_FREE == 0 {
                continue;
            }
            // Claim the slot while its page is locked, so no other insert can take it too;
            // its old lists are stale but harmless until reset just below (they point at
            // elements or FREE slots, which searches skip).
            let new_level = level.min(old.level);
            let mut wal = WalRecord::start(s.index, s.building);
            let image = wal.register(&buf, false);
            // Safety: the registered image of the locked page.
            let it = unsafe { item(image, off) }.expect("items never move");
            it.copy_from_slice(&element_bytes(ElementHeader { heap_tid, level: new_level, flags: 0, graph: old.graph }, v));
            wal.finish();
            drop(buf);
            reset_graph_item(s, old.graph, new_level);
            return Some((pack(block, off), new_level));
        }
        drop(buf);
        let next = block + 1;
        s.update_meta(|m| {
            if m.free_block == block {
                m.free_block = if next < nblocks { next } else { pg_sys::InvalidBlockNumber };
            }
        });
    }
    None
}

/// Empties every list of a graph item; false when it is not there.
fn reset_graph_item(s: &PageStorage, graph: Id, level: usize) -> bool {
    let (block, off) = unpack(graph);
    let buf = PinnedBuffer::read(s.index, block, pg_sys::BUFFER_LOCK_EXCLUSIVE);
    let mut wal = WalRecord::start(s.index, s.building);
    let page = wal.register(&buf, false);
    // Safety: the registered image of the locked page.
    let Some(g) = (unsafe { item(page, off) }) else { return false };
    if g[0] != GRAPH_KIND || GraphItem::level(g) < level {
        return false;
    }
    for l in 0..=GraphItem::level(g) {
        GraphItem::set_neighbors(g, s.params.m, l, &[]);
    }
    wal.finish();
    true
}
