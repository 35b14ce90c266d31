//! CREATE INDEX: `ambuild` and `ambuildempty`.
//!
//! Phases: the heap is scanned and every vector collected (normalised for cosine) with its
//! heap TID and a random level; the graph is built in memory by worker threads
//! (`lorag_hnsw::parallel`, `max_parallel_maintenance_workers + 1` of them, at most one per
//! core) while this backend's main thread waits, reporting progress and watching for cancel;
//! the graph is then laid out on pages in one pass and WAL-logged with `log_newpage_range`.
//! When the vectors and graph would outgrow `maintenance_work_mem`, a NOTICE says so, what was
//! collected is built and written out, and the remaining rows are inserted through the on-disk
//! insert path (correct, but slower). Per-tuple memory is freed as soon as the vector is
//! copied; interrupts are checked for every tuple.

use super::insert::insert_vector;
use super::page::*;
use super::{check_dimensions, metric_of, options};
use crate::vector::VectorRef;
use lorag_hnsw::memory::MemoryGraph;
use lorag_hnsw::rng::Rng;
use lorag_hnsw::{Id, Params, Storage};
use pgrx::{check_for_interrupts, pg_guard, pg_sys};

pub const PHASE_LOAD: i64 = 2;
pub const PHASE_WRITE: i64 = 3;

struct BuildState {
    index: pg_sys::Relation,
    params: Params,
    dim: usize,
    max_level: usize,
    /// Collected vectors, `dim` floats each, and their levels and heap TIDs.
    vectors: Vec<f32>,
    levels: Vec<usize>,
    heap_tids: Vec<pg_sys::ItemPointerData>,
    memory_limit: usize,
    /// Set once the graph was written out: later rows go through the on-disk insert path.
    spilled: bool,
    rng: Rng,
    heap_tuples: f64,
    index_tuples: f64,
}

fn progress(param: u32, value: i64) {
    // Safety: reporting progress is always allowed in a backend.
    unsafe { pg_sys::pgstat_progress_update_param(param as i32, value) };
}

#[pg_guard]
pub unsafe extern "C-unwind" fn ambuild(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    index_info: *mut pg_sys::IndexInfo,
) -> *mut pg_sys::IndexBuildResult {
    if number_of_blocks(index) != 0 {
        pgrx::error!("index \"{}\" already contains data", relation_name(index));
    }
    let metric = metric_of(index);
    let (m, ef_construction) = options(index);
    let params = Params { m, ef_construction, metric };
    // Safety: an index has at least one attribute.
    let typmod = unsafe { (*(*index).rd_att).attrs.as_slice(1)[0].atttypmod };
    let dim = if typmod > 0 { typmod as usize } else { 0 };
    if dim > 0 {
        check_dimensions(dim, 0);
    }
    write_meta_page(index, pg_sys::ForkNumber::MAIN_FORKNUM, params, dim);

    progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_LOAD);
    // Safety: rd_rel is valid for an open relation.
    let reltuples = unsafe { (*(*heap).rd_rel).reltuples };
    progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_TOTAL, reltuples.max(0.0) as i64);

    let started = std::time::Instant::now();
    let mut state = BuildState {
        index,
        params,
        dim,
        max_level: max_level(m),
        vectors: Vec::new(),
        levels: Vec::new(),
        heap_tids: Vec::new(),
        // Safety: a GUC variable, read in the main thread.
        memory_limit: unsafe { pg_sys::maintenance_work_mem } as usize * 1024,
        spilled: false,
        rng: Rng::new(0x6c6f_7261_67), // fixed: the same rows build the same graph
        heap_tuples: 0.0,
        index_tuples: 0.0,
    };
    // Safety: the callback receives `state` back as its last argument.
    unsafe {
        pg_sys::table_index_build_scan(
            heap,
            index,
            index_info,
            true,
            true,
            Some(build_callback),
            &mut state as *mut BuildState as *mut std::ffi::c_void,
            std::ptr::null_mut(),
        );
    }
    pgrx::debug1!("hnsw build: heap scan and collection {:.2} s, {} vectors", started.elapsed().as_secs_f64(), state.levels.len());
    if !state.spilled {
        build_and_write(&mut state);
    }
    let logged = std::time::Instant::now();
    // Safety: rd_rel is valid for an open relation.
    if unsafe { (*(*index).rd_rel).relpersistence } as u8 == pg_sys::RELPERSISTENCE_PERMANENT {
        // Safety: every page of the new index is written and unlocked.
        unsafe { pg_sys::log_newpage_range(index, pg_sys::ForkNumber::MAIN_FORKNUM, 0, number_of_blocks(index), true) };
    }
    pgrx::debug1!("hnsw build: WAL-logging {:.2} s; total {:.2} s", logged.elapsed().as_secs_f64(), started.elapsed().as_secs_f64());
    // Safety: palloc0 of the result PostgreSQL frees.
    unsafe {
        let result = pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexBuildResult>()) as *mut pg_sys::IndexBuildResult;
        (*result).heap_tuples = state.heap_tuples;
        (*result).index_tuples = state.index_tuples;
        result
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn build_callback(
    _index: pg_sys::Relation,
    tid: pg_sys::ItemPointer,
    values: *mut pg_sys::Datum,
    isnull: *mut bool,
    _alive: bool,
    state: *mut std::ffi::c_void,
) {
    // Safety: `state` is the BuildState passed to table_index_build_scan.
    let state = unsafe { &mut *(state as *mut BuildState) };
    state.heap_tuples += 1.0;
    check_for_interrupts!();
    // Safety: one key column.
    if unsafe { *isnull } {
        return;
    }
    // Safety: the column is a vector; the datum lives for this call.
    let raw = unsafe { *values };
    let vector = unsafe { VectorRef::from_datum(raw) };
    let v = vector.as_slice();
    let heap_tid = unsafe { *tid };
    if state.dim == 0 {
        state.dim = v.len();
        check_dimensions(v.len(), 0);
        let storage_dim = v.len() as u32;
        update_meta_direct(state.index, |meta| meta.dim = storage_dim);
    }
    check_dimensions(v.len(), state.dim);
    if state.spilled {
        insert_vector(state.index, v, heap_tid, true);
    } else if let Some(prepared) = state.params.metric.prepare(v) {
        if (state.levels.len() + 1) * bytes_per_element(state.dim, state.params.m) > state.memory_limit {
            spill(state);
            insert_vector(state.index, v, heap_tid, true);
        } else {
            let level = state.params.level_for(state.rng.uniform()).min(state.max_level);
            state.vectors.extend_from_slice(&prepared);
            state.levels.push(level);
            state.heap_tids.push(heap_tid);
        }
    } else {
        return; // a zero vector has no cosine direction: not indexed, as in pgvector
    }
    state.index_tuples += 1.0;
    progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_DONE, state.index_tuples as i64);
    if vector_was_copied(raw, &vector) {
        // Safety: the detoasted copy is ours and no longer used.
        unsafe { pg_sys::pfree(vector.as_ptr() as *mut std::ffi::c_void) };
    }
}

fn vector_was_copied(raw: pg_sys::Datum, v: &VectorRef<'_>) -> bool {
    raw.cast_mut_ptr::<u8>() as *const u8 != v.as_ptr()
}

/// Memory one element takes while building: its vector, its lists (2m neighbours with
/// distances on layer 0, a little more above) and bookkeeping.
fn bytes_per_element(dim: usize, m: usize) -> usize {
    4 * dim + 8 * (2 * m + 2) + 3 * 24 + 8 + 6
}

/// Builds the graph of what was collected with worker threads and writes it to pages.
fn build_and_write(state: &mut BuildState) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        // Safety: a GUC variable, read in the main thread.
        .min(unsafe { pg_sys::max_parallel_maintenance_workers }.max(0) as usize + 1);
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let vectors = std::mem::take(&mut state.vectors);
    let dim = state.dim.max(1);
    let t = std::time::Instant::now();
    let graph = lorag_hnsw::parallel::build_with(state.params, dim, vectors, &state.levels, threads, &cancel, |done| {
        // Safety: the main thread reads the flags that signal handlers set. Only a cancel or
        // a termination stops the workers; other interrupts wait until they are done.
        if unsafe { pg_sys::QueryCancelPending != 0 || pg_sys::ProcDiePending != 0 } {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_DONE, done as i64);
    });
    check_for_interrupts!();
    let Some(graph) = graph else {
        pgrx::ereport!(ERROR, pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED, "canceling index build");
    };
    pgrx::debug1!("hnsw build: graph of {} elements with {threads} threads {:.2} s", graph.len(), t.elapsed().as_secs_f64());
    progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_WRITE);
    let t = std::time::Instant::now();
    write_graph(state, &graph);
    pgrx::debug1!("hnsw build: writing pages {:.2} s", t.elapsed().as_secs_f64());
    state.levels = Vec::new();
    state.heap_tids = Vec::new();
}

fn spill(state: &mut BuildState) {
    let mut report = pgrx::pg_sys::panic::ErrorReport::new(
        pgrx::PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!("hnsw graph no longer fits into maintenance_work_mem after {} tuples", state.levels.len()),
        "lorag",
    );
    report = report
        .set_detail("Building will take significantly more time.")
        .set_hint("Increase maintenance_work_mem to speed up builds.");
    report.report(pgrx::PgLogLevel::NOTICE);
    build_and_write(state);
    state.spilled = true;
}

fn relation_name(rel: pg_sys::Relation) -> String {
    // Safety: rd_rel->relname is a NUL-terminated NameData.
    unsafe { std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy().into_owned() }
}

/// Creates block 0 of `fork`.
fn write_meta_page(index: pg_sys::Relation, fork: pg_sys::ForkNumber::Type, params: Params, dim: usize) {
    let buf = PinnedBuffer::extend(index, fork, false);
    assert_eq!(buf.block(), META_BLOCK);
    let page = buf.page();
    // Safety: a new, exclusively locked page.
    unsafe {
        init_page(page, PAGE_META);
        write_meta(
            page,
            Meta {
                magic: MAGIC,
                version: VERSION,
                dim: dim as u32,
                m: params.m as u32,
                ef_construction: params.ef_construction as u32,
                metric: metric_code(params.metric),
                entry: NO_ID,
                entry_level: 0,
                insert_block: pg_sys::InvalidBlockNumber,
                free_block: pg_sys::InvalidBlockNumber,
                _pad: 0,
            },
        );
        pg_sys::MarkBufferDirty(buf.buffer);
        if fork == pg_sys::ForkNumber::INIT_FORKNUM {
            pg_sys::log_newpage_buffer(buf.buffer, true);
        }
    }
}

/// Changes the meta page during the build (no WAL yet).
fn update_meta_direct(index: pg_sys::Relation, update: impl FnOnce(&mut Meta)) {
    let buf = PinnedBuffer::read(index, META_BLOCK, pg_sys::BUFFER_LOCK_EXCLUSIVE);
    // Safety: the locked meta page.
    unsafe {
        let mut meta = *meta_mut(buf.page());
        update(&mut meta);
        write_meta(buf.page(), meta);
        pg_sys::MarkBufferDirty(buf.buffer);
    }
}

/// Where each item of the graph goes: first fit over the last few pages with room, so graph
/// items fill the space vectors leave at the end of a page.
struct Layout {
    free: Vec<usize>,
    items: Vec<Vec<(bool, u32)>>,
}

impl Layout {
    const LOOK_BACK: usize = 8;

    fn place(&mut self, size: usize, is_element: bool, element: u32) -> Id {
        let cost = item_cost(size);
        let first = self.free.len().saturating_sub(Self::LOOK_BACK);
        let page = match (first..self.free.len()).find(|&p| self.free[p] >= cost) {
            Some(p) => p,
            None => {
                self.free.push(page_capacity());
                self.items.push(Vec::new());
                self.free.len() - 1
            }
        };
        self.free[page] -= cost;
        self.items[page].push((is_element, element));
        pack(1 + page as u32, self.items[page].len() as u16)
    }
}

/// Writes the in-memory graph to pages after the meta page and points the meta page at it.
fn write_graph(state: &BuildState, g: &MemoryGraph) {
    let n = g.len();
    let (m, dim) = (state.params.m, state.dim);
    let first_block = number_of_blocks(state.index);
    assert_eq!(first_block, 1, "the in-memory graph is written right after the meta page");
    let mut layout = Layout { free: Vec::new(), items: Vec::new() };
    let mut element_ids = Vec::with_capacity(n);
    let mut graph_ids = Vec::with_capacity(n);
    for e in 0..n as u32 {
        element_ids.push(layout.place(element_size(dim), true, e));
        graph_ids.push(layout.place(graph_size(m, g.level(e as Id)), false, e));
    }
    let mut neighbors = Vec::new();
    for (p, items) in layout.items.iter().enumerate() {
        check_for_interrupts!();
        let buf = PinnedBuffer::extend(state.index, pg_sys::ForkNumber::MAIN_FORKNUM, false);
        assert_eq!(buf.block(), 1 + p as u32);
        let page = buf.page();
        // Safety: a new, exclusively locked page; items fit by construction of the layout.
        unsafe {
            init_page(page, PAGE_DATA);
            for (k, &(is_element, e)) in items.iter().enumerate() {
                let id = e as Id;
                let bytes = if is_element {
                    let header = ElementHeader { heap_tid: state.heap_tids[e as usize], level: g.level(id), flags: 0, graph: graph_ids[e as usize] };
                    element_bytes(header, g.vector(id))
                } else {
                    let level = g.level(id);
                    let mut bytes = GraphItem::empty(m, level);
                    for l in 0..=level {
                        g.neighbors(id, l, &mut neighbors);
                        let ids: Vec<Id> = neighbors.iter().map(|&x| element_ids[x as usize]).collect();
                        GraphItem::set_neighbors(&mut bytes, m, l, &ids);
                    }
                    bytes
                };
                let off = add_item(page, &bytes).expect("the layout reserved room for every item");
                assert_eq!(off as usize, k + 1);
            }
            pg_sys::MarkBufferDirty(buf.buffer);
        }
    }
    let entry = g.entry_point().map(|(e, level)| (element_ids[e as usize], level));
    let last = layout.items.len() as u32;
    update_meta_direct(state.index, |meta| {
        if let Some((id, level)) = entry {
            meta.entry = id;
            meta.entry_level = level as u32;
        }
        meta.insert_block = if last > 0 { last } else { pg_sys::InvalidBlockNumber };
    });
}

#[pg_guard]
pub unsafe extern "C-unwind" fn ambuildempty(index: pg_sys::Relation) {
    let (m, ef_construction) = options(index);
    let params = Params { m, ef_construction, metric: metric_of(index) };
    // Safety: an index has at least one attribute.
    let typmod = unsafe { (*(*index).rd_att).attrs.as_slice(1)[0].atttypmod };
    write_meta_page(index, pg_sys::ForkNumber::INIT_FORKNUM, params, typmod.max(0) as usize);
}
