//! Index scans: `ambeginscan`, `amrescan`, `amgettuple`, `amendscan`, and the cost estimate.
//!
//! A scan descends from the entry point and searches layer 0 for `hnsw.ef_search` candidates,
//! returned closest first. With `hnsw.iterative_scan` on, when those run out (a WHERE clause
//! filtered them away) the search resumes from where it stopped, until the query's LIMIT is
//! met, the graph is exhausted or `hnsw.max_scan_tuples` elements were visited. Scans take
//! share locks on a few pages at a time, and hold `SCAN_LOCK` in share mode while they walk.

use super::{check_dimensions, TagLock, SCAN_LOCK};
use super::page::*;
use super::storage::PageStorage;
use crate::guc::{IterativeScan, HNSW_EF_SEARCH, HNSW_ITERATIVE_SCAN, HNSW_MAX_SCAN_TUPLES};
use crate::vector::VectorRef;
use lorag_hnsw::search::Scan;
use lorag_hnsw::Candidate;
use pgrx::{check_for_interrupts, pg_guard, pg_sys, PgSqlErrorCode};
use std::collections::VecDeque;

struct ScanState {
    started: bool,
    storage: Option<PageStorage>,
    query: Vec<f32>,
    search: Option<Scan>,
    pending: VecDeque<Candidate>,
    last_distance: f32,
    /// Rows returned so far, and restarts spent on a search that found none (see amgettuple).
    returned: usize,
    restarts: usize,
}

impl ScanState {
    fn new() -> ScanState {
        ScanState {
            started: false,
            storage: None,
            query: Vec::new(),
            search: None,
            pending: VecDeque::new(),
            last_distance: f32::NEG_INFINITY,
            returned: 0,
            restarts: 0,
        }
    }
}

/// A scan's state, in the memory context the scan began in: freed by `amendscan`, or, when the
/// query ends in an ERROR and `amendscan` never runs, by the context's reset callback.
#[repr(C)]
struct Owned {
    callback: pg_sys::MemoryContextCallback,
    state: *mut ScanState,
}

/// Frees the state (once: later calls find it gone).
#[pg_guard]
unsafe extern "C-unwind" fn free_state(owned: *mut std::ffi::c_void) {
    // Safety: `owned` is the Owned that ambeginscan registered, alive until its context goes.
    unsafe {
        let owned = owned as *mut Owned;
        let state = std::mem::replace(&mut (*owned).state, std::ptr::null_mut());
        if !state.is_null() {
            drop(Box::from_raw(state));
        }
    }
}

/// Safety: `scan` was set up by `ambeginscan` and not ended.
unsafe fn state<'a>(scan: pg_sys::IndexScanDesc) -> &'a mut ScanState {
    // Safety: guaranteed by the caller.
    unsafe { &mut *(*((*scan).opaque as *mut Owned)).state }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn ambeginscan(index: pg_sys::Relation, nkeys: i32, norderbys: i32) -> pg_sys::IndexScanDesc {
    // Safety: the standard scan descriptor; the Owned lives in the same memory context, and
    // its callback frees the state if amendscan does not.
    unsafe {
        let scan = pg_sys::RelationGetIndexScan(index, nkeys, norderbys);
        let owned = pg_sys::palloc0(std::mem::size_of::<Owned>()) as *mut Owned;
        (*owned).state = Box::into_raw(Box::new(ScanState::new()));
        (*owned).callback.func = Some(free_state);
        (*owned).callback.arg = owned as *mut std::ffi::c_void;
        pg_sys::MemoryContextRegisterResetCallback(pg_sys::CurrentMemoryContext, &mut (*owned).callback);
        (*scan).opaque = owned as *mut std::ffi::c_void;
        scan
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amrescan(
    scan: pg_sys::IndexScanDesc,
    _keys: pg_sys::ScanKey,
    _nkeys: i32,
    orderbys: pg_sys::ScanKey,
    norderbys: i32,
) {
    // Safety: PostgreSQL passes `norderbys` keys; orderByData has room for them.
    unsafe {
        if !orderbys.is_null() && norderbys > 0 {
            std::ptr::copy(orderbys, (*scan).orderByData, norderbys as usize);
        }
        *state(scan) = ScanState::new();
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amgettuple(scan: pg_sys::IndexScanDesc, _direction: pg_sys::ScanDirection::Type) -> bool {
    // Safety: set up by ambeginscan.
    let st = unsafe { state(scan) };
    // Safety: the scan descriptor is valid.
    let index = unsafe { (*scan).indexRelation };
    if !st.started {
        let _walk = TagLock::take(index, SCAN_LOCK, pg_sys::ShareLock);
        // Safety: the scan descriptor is valid.
        unsafe { start(scan, st) };
    }
    let strict = HNSW_ITERATIVE_SCAN.get() == IterativeScan::StrictOrder;
    loop {
        check_for_interrupts!();
        let storage = st.storage.as_ref().expect("started");
        while let Some(c) = st.pending.pop_front() {
            let Some(h) = storage.header(c.id) else { continue };
            if !h.is_live() {
                continue;
            }
            if strict && c.distance < st.last_distance {
                continue; // would break the order already returned
            }
            st.last_distance = st.last_distance.max(c.distance);
            st.returned += 1;
            // Safety: the scan descriptor is valid.
            unsafe {
                (*scan).xs_heaptid = h.heap_tid;
                (*scan).xs_recheck = false;
                (*scan).xs_recheckorderby = false;
            }
            return true;
        }
        let Some(search) = st.search.as_mut() else { return false };
        let iterative = HNSW_ITERATIVE_SCAN.get() != IterativeScan::Off;
        let first = search.scanned() <= 1;
        let batch = if !first && (!iterative || search.scanned() >= HNSW_MAX_SCAN_TUPLES.get().max(1) as usize) {
            Vec::new()
        } else {
            let _walk = TagLock::take(index, SCAN_LOCK, pg_sys::ShareLock);
            search.next_batch(storage, &st.query, HNSW_EF_SEARCH.get().max(1) as usize)
        };
        if batch.is_empty() {
            // A search that found no live element started from a stale entry point (VACUUM
            // freed it and an insert reused the slot meanwhile): start again, a few times.
            if st.returned == 0 && st.restarts < 3 {
                st.restarts += 1;
                let restarts = st.restarts;
                *st = ScanState::new();
                st.restarts = restarts;
                let _walk = TagLock::take(index, SCAN_LOCK, pg_sys::ShareLock);
                // Safety: the scan descriptor is valid.
                unsafe { start(scan, st) };
                continue;
            }
            return false;
        }
        st.pending.extend(batch);
    }
}

/// Reads the query, checks it, and positions the search.
///
/// Safety: `scan` is a valid scan descriptor set up by ambeginscan.
unsafe fn start(scan: pg_sys::IndexScanDesc, st: &mut ScanState) {
    st.started = true;
    // Safety: guaranteed by the caller.
    let (index, norderbys, key) = unsafe { ((*scan).indexRelation, (*scan).numberOfOrderBys, (*scan).orderByData) };
    if norderbys < 1 {
        let report = pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "cannot scan hnsw index without order",
            "lorag",
        )
        .set_hint("Use the index with ORDER BY embedding <=> query LIMIT n.");
        report.report(pgrx::PgLogLevel::ERROR);
    }
    let meta = read_meta(index);
    let storage = PageStorage::new(index, &meta);
    // Safety: one order-by key, copied in amrescan.
    let (is_null, arg) = unsafe { ((*key).sk_flags & pg_sys::SK_ISNULL as i32 != 0, (*key).sk_argument) };
    st.query = if is_null || meta.dim == 0 {
        // NULL query: every distance is NULL, any order is right; start anywhere.
        let mut q = vec![0.0f32; meta.dim.max(1) as usize];
        q[0] = 1.0;
        q
    } else {
        // Safety: the argument is a non-null vector datum.
        let v = unsafe { VectorRef::from_datum(arg) }.as_slice();
        if v.len() != meta.dim as usize {
            crate::error::raise(lorag_vector::VectorError::DimensionMismatch(meta.dim as usize, v.len()));
        }
        check_dimensions(v.len(), meta.dim as usize);
        storage.params.metric.prepare(v).unwrap_or_else(|| v.to_vec())
    };
    // VACUUM may free the entry point (and an insert reuse its slot) between reading the meta
    // page and starting: start from an entry point that is still the element the meta page
    // names (a DELETED one still routes searches), re-reading the meta page if needed.
    for attempt in 0..5 {
        let Some((entry, level)) = read_meta(index).entry_point() else { break };
        storage.forget();
        let usable = storage.header(entry).is_some_and(|h| h.flags & FLAG_FREE == 0 && h.level == level);
        if usable || attempt == 4 {
            st.search = Some(Scan::new(&storage, &st.query));
            break;
        }
    }
    st.storage = Some(storage);
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amendscan(scan: pg_sys::IndexScanDesc) {
    // Safety: set up by ambeginscan; the Owned itself goes with its memory context.
    unsafe {
        let owned = (*scan).opaque;
        if !owned.is_null() {
            free_state(owned);
            (*scan).opaque = std::ptr::null_mut();
        }
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amcostestimate(
    _root: *mut pg_sys::PlannerInfo,
    path: *mut pg_sys::IndexPath,
    _loop_count: f64,
    startup: *mut pg_sys::Cost,
    total: *mut pg_sys::Cost,
    selectivity: *mut pg_sys::Selectivity,
    correlation: *mut f64,
    pages: *mut f64,
) {
    // Safety: PostgreSQL passes valid out-pointers and path.
    unsafe {
        *correlation = 0.0;
        if (*path).indexorderbys.is_null() {
            // Without ORDER BY distance the index cannot be scanned at all.
            *startup = 1.0e10;
            *total = 1.0e10;
            *selectivity = 0.0;
            *pages = 0.0;
            return;
        }
        let info = (*path).indexinfo;
        let tuples = (*info).tuples.max(1.0);
        let index_pages = (*info).pages as f64;
        let ef = HNSW_EF_SEARCH.get().max(1) as f64;
        // A search visits about ef * 2m elements (m = 16 by default), each one distance.
        let visited = (ef * 32.0).min(tuples);
        let fetched = visited.min(index_pages.max(1.0));
        let cost = fetched * pg_sys::seq_page_cost + visited * pg_sys::cpu_operator_cost * 10.0;
        // All the work happens before the first row: startup cost.
        *startup = cost;
        *total = cost;
        *selectivity = 1.0;
        *pages = fetched;
    }
}
