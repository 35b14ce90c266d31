//! VACUUM: `ambulkdelete` and `amvacuumcleanup`.
//!
//! Three passes; the first two under the exclusive `UPDATE_LOCK` (inserts wait; scans go on):
//! 1. mark the elements whose heap rows are dead DELETED (scans skip them, but still route
//!    through them);
//! 2. repair: every live list that points at a DELETED element is rebuilt from its live
//!    neighbours and the deleted ones' neighbours, and a deleted entry point is replaced;
//! 3. release `UPDATE_LOCK` (nothing can reach a DELETED element any more, so inserts may go
//!    on; and PostgreSQL never takes a heavyweight lock while holding a page lock), wait for
//!    the scans walking the graph (`SCAN_LOCK`), which may still hold ids of DELETED elements,
//!    then turn DELETED into FREE, for inserts to reuse.

use super::page::*;
use super::storage::PageStorage;
use super::{TagLock, SCAN_LOCK, UPDATE_LOCK};
use lorag_hnsw::Id;
use pgrx::{check_for_interrupts, pg_guard, pg_sys};

fn ensure_stats(stats: *mut pg_sys::IndexBulkDeleteResult) -> *mut pg_sys::IndexBulkDeleteResult {
    if stats.is_null() {
        // Safety: palloc0 of the struct PostgreSQL frees.
        unsafe { pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexBulkDeleteResult>()) as *mut pg_sys::IndexBulkDeleteResult }
    } else {
        stats
    }
}

/// Calls `f(block, offset, header)` for every element item, page by page, with `lock` held on
/// the page; `f` returns the offsets to set `flags` on (with GenericXLog).
fn for_each_element(
    index: pg_sys::Relation,
    dim: usize,
    lock: u32,
    mut f: impl FnMut(pg_sys::BlockNumber, pg_sys::OffsetNumber, &ElementHeader) -> Option<u8>,
) {
    for block in 1..number_of_blocks(index) {
        check_for_interrupts!();
        // Safety: honours vacuum_cost_delay.
        unsafe { pg_sys::vacuum_delay_point() };
        let buf = PinnedBuffer::read(index, block, lock);
        let page = buf.page();
        let mut changes: Vec<(pg_sys::OffsetNumber, u8)> = Vec::new();
        // Safety: the locked page.
        let max = unsafe { pg_sys::PageGetMaxOffsetNumber(page) };
        for off in 1..=max {
            // Safety: the locked page.
            let Some(it) = (unsafe { item(page, off) }) else { continue };
            if !is_element(it, dim) {
                continue;
            }
            if let Some(flags) = f(block, off, &ElementHeader::parse(it)) {
                changes.push((off, flags));
            }
        }
        if !changes.is_empty() {
            let mut wal = WalRecord::start(index, false);
            let image = wal.register(&buf, false);
            for (off, flags) in changes {
                // Safety: the registered image of the locked page.
                if let Some(it) = unsafe { item(image, off) } {
                    it[2] = flags;
                }
            }
            wal.finish();
        }
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn ambulkdelete(
    info: *mut pg_sys::IndexVacuumInfo,
    stats: *mut pg_sys::IndexBulkDeleteResult,
    callback: pg_sys::IndexBulkDeleteCallback,
    callback_state: *mut std::ffi::c_void,
) -> *mut pg_sys::IndexBulkDeleteResult {
    let stats = ensure_stats(stats);
    // Safety: PostgreSQL passes a valid info.
    let index = unsafe { (*info).index };
    let callback = callback.expect("bulkdelete has a callback");
    let meta = read_meta(index);
    let dim = meta.dim as usize;
    let update = TagLock::take(index, UPDATE_LOCK, pg_sys::ExclusiveLock);

    let mut removed = 0.0;
    let mut live: Vec<(Id, usize)> = Vec::new();
    for_each_element(index, dim, pg_sys::BUFFER_LOCK_EXCLUSIVE, |block, off, h| {
        if !h.is_live() {
            return None;
        }
        let mut tid = h.heap_tid;
        // Safety: the callback and its state come from VACUUM.
        if unsafe { callback(&mut tid, callback_state) } {
            removed += 1.0;
            Some(h.flags | FLAG_DELETED)
        } else {
            live.push((pack(block, off), h.level));
            None
        }
    });

    if removed > 0.0 {
        let mut storage = PageStorage::new(index, &meta);
        let params = storage.params;
        for (i, &(id, level)) in live.iter().enumerate() {
            if i % 1024 == 0 {
                check_for_interrupts!();
                storage.forget(); // bounded memory for the header cache
            }
            lorag_hnsw::repair::repair_element(&mut storage, &params, id, level);
        }
        if let Some((entry, _)) = read_meta(index).entry_point() {
            if !live.iter().any(|&(id, _)| id == entry) {
                use lorag_hnsw::StorageMut;
                let best = live.iter().max_by_key(|(_, l)| *l).copied();
                storage.set_entry_point(best);
            }
        }
        drop(update);
        drop(TagLock::take(index, SCAN_LOCK, pg_sys::ExclusiveLock));
        let mut first_free = pg_sys::InvalidBlockNumber;
        for_each_element(index, dim, pg_sys::BUFFER_LOCK_EXCLUSIVE, |block, _, h| {
            if h.flags & FLAG_DELETED != 0 {
                first_free = first_free.min(block);
                Some(FLAG_FREE)
            } else {
                None
            }
        });
        storage.update_meta(|m| {
            if first_free != pg_sys::InvalidBlockNumber && (m.free_block == pg_sys::InvalidBlockNumber || first_free < m.free_block) {
                m.free_block = first_free;
            }
        });
    }
    // Safety: `stats` is valid (ensure_stats).
    unsafe {
        (*stats).tuples_removed += removed;
        (*stats).num_index_tuples = live.len() as f64;
        (*stats).num_pages = number_of_blocks(index);
    }
    stats
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amvacuumcleanup(
    info: *mut pg_sys::IndexVacuumInfo,
    stats: *mut pg_sys::IndexBulkDeleteResult,
) -> *mut pg_sys::IndexBulkDeleteResult {
    // Safety: PostgreSQL passes a valid info.
    unsafe {
        if (*info).analyze_only {
            return stats;
        }
        let index = (*info).index;
        if !stats.is_null() {
            (*stats).num_pages = number_of_blocks(index);
            return stats;
        }
        let stats = ensure_stats(stats);
        let dim = read_meta(index).dim as usize;
        let mut n = 0.0;
        for_each_element(index, dim, pg_sys::BUFFER_LOCK_SHARE, |_, _, h| {
            if h.is_live() {
                n += 1.0;
            }
            None
        });
        (*stats).num_index_tuples = n;
        (*stats).num_pages = number_of_blocks(index);
        stats
    }
}
