//! `hnsw_check(index)`: walks every page of an hnsw index and lists structural problems, for
//! tests and for users after a crash. An empty result means the index is sound.

use super::page::*;
use crate::fmgr::{arg, sql_function};
use lorag_hnsw::Id;
use pgrx::{pg_sys, IntoDatum};
use std::collections::HashMap;

struct Graph {
    level: usize,
    lists: Vec<Vec<Id>>,
}

pub fn check(index: pg_sys::Relation) -> Vec<String> {
    let mut problems = Vec::new();
    let meta = {
        let buf = PinnedBuffer::read(index, META_BLOCK, pg_sys::BUFFER_LOCK_SHARE);
        // Safety: the locked block 0.
        unsafe { *meta_mut(buf.page()) }
    };
    if meta.magic != MAGIC || meta.version != VERSION {
        problems.push(format!("meta page: bad magic {:#x} or version {}", meta.magic, meta.version));
        return problems;
    }
    let (dim, m) = (meta.dim as usize, meta.m as usize);
    let mut elements: HashMap<Id, ElementHeader> = HashMap::new();
    let mut graphs: HashMap<Id, Graph> = HashMap::new();
    for block in 1..number_of_blocks(index) {
        pgrx::check_for_interrupts!();
        let buf = PinnedBuffer::read(index, block, pg_sys::BUFFER_LOCK_SHARE);
        let page = buf.page();
        // Safety: the locked page.
        let opaque = unsafe { *(pg_sys::PageGetSpecialPointer(page) as *const PageOpaque) };
        if opaque.magic != MAGIC || opaque.kind != PAGE_DATA {
            problems.push(format!("block {block}: not an hnsw data page"));
            continue;
        }
        // Safety: the locked page.
        let max = unsafe { pg_sys::PageGetMaxOffsetNumber(page) };
        for off in 1..=max {
            // Safety: the locked page.
            let Some(it) = (unsafe { item(page, off) }) else { continue };
            let id = pack(block, off);
            match it.first() {
                Some(&ELEMENT_KIND) if it.len() == element_size(dim) => {
                    let h = ElementHeader::parse(it);
                    if h.is_live() && vector_of(it, dim).iter().any(|x| !x.is_finite()) {
                        problems.push(format!("element ({block},{off}): non-finite vector element"));
                    }
                    elements.insert(id, h);
                }
                Some(&GRAPH_KIND) if it.len() == graph_size(m, GraphItem::level(it)) => {
                    let level = GraphItem::level(it);
                    let lists = (0..=level)
                        .map(|l| {
                            let mut v = Vec::new();
                            GraphItem::neighbors(it, m, l, &mut v);
                            v
                        })
                        .collect();
                    graphs.insert(id, Graph { level, lists });
                }
                _ => problems.push(format!("item ({block},{off}): neither an element nor a graph item")),
            }
        }
    }
    let name = |id: Id| {
        let (b, o) = unpack(id);
        format!("({b},{o})")
    };
    let mut top_live = None;
    for (&id, h) in &elements {
        if !h.is_live() {
            if h.flags & FLAG_DELETED != 0 {
                problems.push(format!("element {}: marked deleted outside VACUUM", name(id)));
            }
            continue;
        }
        top_live = top_live.max(Some(h.level));
        let Some(g) = graphs.get(&h.graph) else {
            problems.push(format!("element {}: graph item {} missing", name(id), name(h.graph)));
            continue;
        };
        if g.level < h.level {
            problems.push(format!("element {}: level {} but graph item has {}", name(id), h.level, g.level));
        }
        for l in 0..=h.level.min(g.level) {
            let list = &g.lists[l];
            let max = if l == 0 { 2 * m } else { m };
            if list.len() > max {
                problems.push(format!("element {}: {} neighbours on layer {l}, at most {max}", name(id), list.len()));
            }
            let mut seen = std::collections::HashSet::new();
            for &n in list {
                if n == id {
                    problems.push(format!("element {}: links to itself on layer {l}", name(id)));
                } else if !seen.insert(n) {
                    problems.push(format!("element {}: links twice to {} on layer {l}", name(id), name(n)));
                }
                match elements.get(&n) {
                    None => problems.push(format!("element {}: neighbour {} on layer {l} is not an element", name(id), name(n))),
                    Some(t) if !t.is_live() => {
                        problems.push(format!("element {}: neighbour {} on layer {l} is deleted or free", name(id), name(n)))
                    }
                    Some(t) if t.level < l => problems.push(format!(
                        "element {}: neighbour {} on layer {l} only reaches layer {}",
                        name(id),
                        name(n),
                        t.level
                    )),
                    _ => {}
                }
            }
        }
    }
    match (meta.entry_point(), top_live) {
        (None, Some(_)) => problems.push("meta page: no entry point but live elements exist".into()),
        (Some((e, level)), top) => match elements.get(&e) {
            Some(h) if h.is_live() => {
                if h.level != level {
                    problems.push(format!("entry point {}: meta says level {level}, element has {}", name(e), h.level));
                }
                if let Some(top) = top {
                    if top > level {
                        problems.push(format!("entry point {}: level {level} below the highest element level {top}", name(e)));
                    }
                }
            }
            _ if top.is_none() => {}
            _ => problems.push(format!("entry point {}: not a live element", name(e))),
        },
        (None, None) => {}
    }
    problems.sort();
    problems
}

// lorag._hnsw_check(regclass) → text[]
sql_function!(lorag_hnsw_check, pg_finfo_lorag_hnsw_check, |fcinfo| {
    // Safety: argument 0 is a regclass (an oid).
    let oid = pg_sys::Oid::from(unsafe { arg(fcinfo, 0) }.value() as u32);
    // Safety: index_open checks the relation exists and locks it.
    let index = unsafe { pg_sys::index_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    // Safety: the relation is open.
    let is_hnsw = unsafe {
        let name = pg_sys::get_am_name((*(*index).rd_rel).relam);
        !name.is_null() && std::ffi::CStr::from_ptr(name).to_bytes() == b"hnsw"
    };
    if !is_hnsw {
        // Safety: opened above.
        unsafe { pg_sys::index_close(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "hnsw_check() needs an hnsw index",
            "Pass the name of an index created with USING hnsw."
        );
    }
    let problems = check(index);
    // Safety: opened above.
    unsafe { pg_sys::index_close(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    problems.into_datum().expect("an array is never NULL")
});
