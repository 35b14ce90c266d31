//! The `hnsw` index access method (pgvector's names, lorag's pages and algorithms).
//!
//! One file per index phase, as in pgvector: [`build`] (`ambuild`, `ambuildempty`), [`insert`]
//! (`aminsert`), [`scan`] (`ambeginscan`, `amrescan`, `amgettuple`, `amendscan`, cost),
//! [`vacuum`] (`ambulkdelete`, `amvacuumcleanup`), [`check`] (the verification function);
//! [`page`] is the on-disk layout, [`storage`] the graph over it, and [`buffers`] how its pages
//! are found in shared buffers.

pub mod buffers;
pub mod build;
pub mod check;
pub mod insert;
pub mod page;
pub mod scan;
pub mod storage;
pub mod vacuum;

use crate::fmgr::sql_function;
use lorag_hnsw::{Metric, DEFAULT_EF_CONSTRUCTION, DEFAULT_M, MAX_EF_CONSTRUCTION, MAX_M, MIN_EF_CONSTRUCTION, MIN_M};
use pgrx::{pg_guard, pg_sys, PgSqlErrorCode};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Heavyweight lock tag (a page number no data page uses) that inserts take in share mode
/// and VACUUM's repair in exclusive mode, so repair never races a half-linked insert.
pub const UPDATE_LOCK: pg_sys::BlockNumber = 0xFFFF_FFFE;

/// Heavyweight lock tag that scans hold in share mode while they walk the graph (the descent
/// and each batch), and that VACUUM takes exclusively for an instant before it frees the
/// elements it deleted: that waits out every walk that may still hold their ids, and walks
/// starting later cannot reach them (VACUUM unlinked them first), so no walk follows a
/// neighbour list into a slot an insert has just reused. (Candidates an iterative scan keeps
/// between batches can still meet a reused slot: its new row is one the scan's snapshot does
/// not see.) Never taken while another of these tags is held.
pub const SCAN_LOCK: pg_sys::BlockNumber = 0xFFFF_FFFD;

/// A heavyweight lock on one of the tags above, released when dropped (but not while unwinding
/// from an ERROR: the abort releases it).
pub struct TagLock {
    index: pg_sys::Relation,
    tag: pg_sys::BlockNumber,
    mode: pg_sys::LOCKMODE,
}

impl TagLock {
    pub fn take(index: pg_sys::Relation, tag: pg_sys::BlockNumber, mode: u32) -> TagLock {
        let mode = mode as pg_sys::LOCKMODE;
        // Safety: an open relation; the lock is released in drop or by the abort.
        unsafe { pg_sys::LockPage(index, tag, mode) };
        TagLock { index, tag, mode }
    }
}

impl Drop for TagLock {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // Safety: taken in `take`.
            unsafe { pg_sys::UnlockPage(self.index, self.tag, self.mode) };
        }
    }
}

static RELOPT_KIND: AtomicU32 = AtomicU32::new(0);

/// `WITH (m = ..., ef_construction = ...)`, as PostgreSQL's reloptions parser fills it.
#[repr(C)]
pub struct Options {
    vl_len_: i32,
    m: i32,
    ef_construction: i32,
}

/// Registers the index options; called from `_PG_init`.
pub fn init() {
    // Safety: _PG_init runs in the main thread; the strings are static.
    unsafe {
        let kind = pg_sys::add_reloption_kind();
        RELOPT_KIND.store(kind, Ordering::Relaxed);
        pg_sys::add_int_reloption(
            kind,
            c"m".as_ptr(),
            c"Max number of connections per element (2m on layer 0)".as_ptr(),
            DEFAULT_M as i32,
            MIN_M as i32,
            MAX_M as i32,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
        pg_sys::add_int_reloption(
            kind,
            c"ef_construction".as_ptr(),
            c"Size of the dynamic candidate list while building the graph".as_ptr(),
            DEFAULT_EF_CONSTRUCTION as i32,
            MIN_EF_CONSTRUCTION as i32,
            MAX_EF_CONSTRUCTION as i32,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
    }
}

/// `(m, ef_construction)` of an index, defaults where not given.
pub fn options(index: pg_sys::Relation) -> (usize, usize) {
    // Safety: rd_options is null or the bytea amoptions returned.
    unsafe {
        let opts = (*index).rd_options as *const Options;
        if opts.is_null() {
            (DEFAULT_M, DEFAULT_EF_CONSTRUCTION)
        } else {
            ((*opts).m as usize, (*opts).ef_construction as usize)
        }
    }
}

/// The metric of an index, from its opclass's distance support function.
pub fn metric_of(index: pg_sys::Relation) -> Metric {
    // Safety: the index is open; support function 1 exists for every hnsw opclass.
    let name = unsafe {
        let proc_oid = pg_sys::index_getprocid(index, 1, 1);
        let name = pg_sys::get_func_name(proc_oid);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    };
    match name.as_str() {
        "vector_l2_squared_distance" | "l2_distance" => Metric::L2,
        "vector_negative_inner_product" | "inner_product" => Metric::InnerProduct,
        "cosine_distance" => Metric::Cosine,
        other => {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
                format!("hnsw operator class uses unsupported distance function \"{other}\""),
                "Use vector_cosine_ops, vector_l2_ops or vector_ip_ops."
            );
        }
    }
}

/// Checks that an index's vectors have `dim` dimensions, with errors users can act on.
pub fn check_dimensions(dim: usize, index_dim: usize) {
    if dim > page::MAX_DIM {
        let mut report = pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("vector cannot have more than {} dimensions for hnsw index", page::MAX_DIM),
            "lorag",
        );
        report = report.set_hint("Reduce the dimensions, e.g. index subvector(embedding, 1, 2000)::vector(2000), or use a smaller embedding model.");
        report.report(pgrx::PgLogLevel::ERROR);
    }
    if index_dim != 0 && dim != index_dim {
        let mut report = pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!("expected {index_dim} dimensions, not {dim}"),
            "lorag",
        );
        report = report.set_hint(format!(
            "Every vector in an hnsw index must have the same dimensions; declare the column as vector({index_dim}) to catch this on insert."
        ));
        report.report(pgrx::PgLogLevel::ERROR);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn amoptions(reloptions: pg_sys::Datum, validate: bool) -> *mut pg_sys::bytea {
    let table = [
        pg_sys::relopt_parse_elt {
            optname: c"m".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(Options, m) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"ef_construction".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(Options, ef_construction) as i32,
        },
    ];
    // Safety: the table describes `Options`; PostgreSQL validates the ranges.
    unsafe {
        pg_sys::build_reloptions(
            reloptions,
            validate,
            RELOPT_KIND.load(Ordering::Relaxed),
            std::mem::size_of::<Options>(),
            table.as_ptr(),
            table.len() as i32,
        ) as *mut pg_sys::bytea
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn amvalidate(_opclass: pg_sys::Oid) -> bool {
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn ambuildphasename(phase: i64) -> *mut std::ffi::c_char {
    let name: &CStr = match phase {
        build::PHASE_LOAD => c"loading tuples",
        build::PHASE_WRITE => c"writing index pages",
        _ => return std::ptr::null_mut(),
    };
    // Safety: a palloc'd copy for the caller.
    unsafe { pg_sys::pstrdup(name.as_ptr()) }
}

// hnswhandler(internal) → index_am_handler
sql_function!(lorag_hnsw_handler, pg_finfo_lorag_hnsw_handler, |_fcinfo| {
    // Safety: makeNode-equivalent allocation of the routine PostgreSQL expects.
    unsafe {
        let am = pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexAmRoutine>()) as *mut pg_sys::IndexAmRoutine;
        let a = &mut *am;
        a.type_ = pg_sys::NodeTag::T_IndexAmRoutine;
        a.amstrategies = 0;
        a.amsupport = 2;
        a.amoptsprocnum = 0;
        a.amcanorder = false;
        a.amcanorderbyop = true; // ORDER BY embedding <=> query is the only way to scan
        a.amcanbackward = false;
        a.amcanunique = false;
        a.amcanmulticol = false;
        a.amoptionalkey = true; // scans have no WHERE keys, only the ORDER BY
        a.amsearcharray = false;
        a.amsearchnulls = false;
        a.amstorage = false;
        a.amclusterable = false;
        a.ampredlocks = false;
        a.amcanparallel = false;
        a.amcaninclude = false;
        a.amusemaintenanceworkmem = false;
        a.amparallelvacuumoptions = 0; // VACUUM_OPTION_NO_PARALLEL: bulkdelete takes the update lock
        a.amkeytype = pg_sys::InvalidOid;
        a.ambuild = Some(build::ambuild);
        a.ambuildempty = Some(build::ambuildempty);
        a.aminsert = Some(insert::aminsert);
        a.ambulkdelete = Some(vacuum::ambulkdelete);
        a.amvacuumcleanup = Some(vacuum::amvacuumcleanup);
        a.amcanreturn = None;
        a.amcostestimate = Some(scan::amcostestimate);
        a.amoptions = Some(amoptions);
        a.amproperty = None;
        a.ambuildphasename = Some(ambuildphasename);
        a.amvalidate = Some(amvalidate);
        a.amadjustmembers = None;
        a.ambeginscan = Some(scan::ambeginscan);
        a.amrescan = Some(scan::amrescan);
        a.amgettuple = Some(scan::amgettuple);
        a.amgetbitmap = None;
        a.amendscan = Some(scan::amendscan);
        a.ammarkpos = None;
        a.amrestrpos = None;
        a.amestimateparallelscan = None;
        a.aminitparallelscan = None;
        a.amparallelrescan = None;
        pg_sys::Datum::from(am)
    }
});
