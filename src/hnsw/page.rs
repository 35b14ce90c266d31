//! The index on PostgreSQL pages.
//!
//! Block 0 is the meta page: dimensions, options, metric, entry point, insert and reuse hints.
//! Every other block is a data page of ordinary line-pointer items of two kinds:
//!
//! ```text
//! element item   kind 'E' (1) | level (1) | flags (1) | pad (1) | heap TID (6) | graph item TID (6)
//!                | float4 x[dim]
//! graph item     kind 'G' (1) | level (1) | count per level (1 each) | TIDs (6 each):
//!                2m slots for layer 0, then m slots for each layer 1..=level
//! ```
//!
//! An element's id is its item's (block, offset) packed as `block << 16 | offset`. Neighbour
//! lists hold such ids. Items never move once written (no compaction), so ids stay valid;
//! VACUUM marks dead elements FREE and inserts reuse them in place.
//!
//! Locking: buffer locks are held one at a time, never nested, except that a page is locked
//! exclusively while the meta page is locked to update the insert hint (always data page first
//! would deadlock with nothing, because nobody locks meta then a data page). Every change goes
//! through GenericXLog, so it is crash-safe and replicated; the build writes pages directly
//! and then WAL-logs them in one pass (`log_newpage_range`).

use lorag_hnsw::{Id, Metric};
use pgrx::pg_sys;
use std::mem::size_of;

pub const META_BLOCK: pg_sys::BlockNumber = 0;
pub const MAGIC: u32 = 0x4c52_4857; // "LRHW"
pub const VERSION: u32 = 1;
/// Largest dimension count an element item can hold on an 8 kB page (pgvector's limit too).
pub const MAX_DIM: usize = 2000;

pub const ELEMENT_HEADER: usize = 16;
pub const FLAG_DELETED: u8 = 1;
pub const FLAG_FREE: u8 = 2;
pub const GRAPH_KIND: u8 = b'G';
pub const ELEMENT_KIND: u8 = b'E';
pub const TID_SIZE: usize = 6;

/// Id of no element.
pub const NO_ID: Id = Id::MAX;

pub fn pack(block: pg_sys::BlockNumber, offset: pg_sys::OffsetNumber) -> Id {
    (block as Id) << 16 | offset as Id
}

pub fn unpack(id: Id) -> (pg_sys::BlockNumber, pg_sys::OffsetNumber) {
    ((id >> 16) as pg_sys::BlockNumber, (id & 0xffff) as pg_sys::OffsetNumber)
}

/// The meta page's contents.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub magic: u32,
    pub version: u32,
    pub dim: u32,
    pub m: u32,
    pub ef_construction: u32,
    pub metric: u32,
    pub entry: Id,
    pub entry_level: u32,
    /// The page inserts try first.
    pub insert_block: u32,
    /// The first page that may hold FREE elements, or InvalidBlockNumber.
    pub free_block: u32,
    pub _pad: u32,
}

impl Meta {
    pub fn metric(&self) -> Metric {
        metric_from_code(self.metric)
    }

    pub fn entry_point(&self) -> Option<(Id, usize)> {
        (self.entry != NO_ID).then_some((self.entry, self.entry_level as usize))
    }

    pub fn params(&self) -> lorag_hnsw::Params {
        lorag_hnsw::Params { m: self.m as usize, ef_construction: self.ef_construction as usize, metric: self.metric() }
    }
}

pub fn metric_code(m: Metric) -> u32 {
    match m {
        Metric::L2 => 1,
        Metric::InnerProduct => 2,
        Metric::Cosine => 3,
    }
}

pub fn metric_from_code(code: u32) -> Metric {
    match code {
        1 => Metric::L2,
        2 => Metric::InnerProduct,
        _ => Metric::Cosine,
    }
}

/// Special space of every page: which kind it is.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PageOpaque {
    pub kind: u16,
    pub _pad: u16,
    pub magic: u32,
}

pub const PAGE_META: u16 = 1;
pub const PAGE_DATA: u16 = 2;

pub fn element_size(dim: usize) -> usize {
    ELEMENT_HEADER + 4 * dim
}

pub fn graph_size(m: usize, level: usize) -> usize {
    2 + (level + 1) + TID_SIZE * (2 * m + level * m)
}

/// Bytes of a page available to items and their line pointers.
pub fn page_capacity() -> usize {
    pg_sys::BLCKSZ as usize - size_of_page_header() - maxalign(size_of::<PageOpaque>())
}

pub fn size_of_page_header() -> usize {
    std::mem::offset_of!(pg_sys::PageHeaderData, pd_linp)
}

pub fn maxalign(n: usize) -> usize {
    (n + 7) & !7
}

/// Space an item of `size` bytes takes on a page, line pointer included.
pub fn item_cost(size: usize) -> usize {
    maxalign(size) + size_of::<pg_sys::ItemIdData>()
}

/// The highest level whose graph item fits on a page.
pub fn max_level(m: usize) -> usize {
    (0..=lorag_hnsw::MAX_LEVEL).rev().find(|&l| item_cost(graph_size(m, l)) <= page_capacity()).unwrap_or(0)
}

pub fn write_tid(dst: &mut [u8], id: Id) {
    let (block, offset) = unpack(id);
    dst[..4].copy_from_slice(&block.to_le_bytes());
    dst[4..6].copy_from_slice(&offset.to_le_bytes());
}

pub fn read_tid(src: &[u8]) -> Id {
    let block = u32::from_le_bytes(src[..4].try_into().unwrap());
    let offset = u16::from_le_bytes(src[4..6].try_into().unwrap());
    pack(block, offset)
}

/// A heap TID in an element header (ItemPointerData's 6-byte layout).
pub fn write_heap_tid(dst: &mut [u8], tid: pg_sys::ItemPointerData) {
    // Safety: ItemPointerData is 6 plain bytes.
    let bytes: [u8; 6] = unsafe { std::mem::transmute(tid) };
    dst[..6].copy_from_slice(&bytes);
}

pub fn read_heap_tid(src: &[u8]) -> pg_sys::ItemPointerData {
    let bytes: [u8; 6] = src[..6].try_into().unwrap();
    // Safety: ItemPointerData is 6 plain bytes.
    unsafe { std::mem::transmute(bytes) }
}

/// A parsed element header.
#[derive(Debug, Clone, Copy)]
pub struct ElementHeader {
    pub heap_tid: pg_sys::ItemPointerData,
    pub level: usize,
    pub flags: u8,
    pub graph: Id,
}

impl ElementHeader {
    pub fn parse(item: &[u8]) -> ElementHeader {
        ElementHeader {
            level: item[1] as usize,
            flags: item[2],
            heap_tid: read_heap_tid(&item[4..10]),
            graph: read_tid(&item[10..16]),
        }
    }

    pub fn write(&self, item: &mut [u8]) {
        item[0] = ELEMENT_KIND;
        item[1] = self.level as u8;
        item[2] = self.flags;
        item[3] = 0;
        write_heap_tid(&mut item[4..10], self.heap_tid);
        write_tid(&mut item[10..16], self.graph);
    }

    pub fn is_live(&self) -> bool {
        self.flags & (FLAG_DELETED | FLAG_FREE) == 0
    }
}

/// A graph item's neighbour lists, read from or written into item bytes.
pub struct GraphItem;

impl GraphItem {
    pub fn empty(m: usize, level: usize) -> Vec<u8> {
        let mut v = vec![0u8; graph_size(m, level)];
        v[0] = GRAPH_KIND;
        v[1] = level as u8;
        v
    }

    pub fn level(item: &[u8]) -> usize {
        item[1] as usize
    }

    fn slots_before(m: usize, level: usize) -> usize {
        if level == 0 {
            0
        } else {
            2 * m + (level - 1) * m
        }
    }

    pub fn neighbors(item: &[u8], m: usize, level: usize, out: &mut Vec<Id>) {
        out.clear();
        let top = Self::level(item);
        if level > top {
            return;
        }
        let count = item[2 + level] as usize;
        let base = 2 + (top + 1) + TID_SIZE * Self::slots_before(m, level);
        for i in 0..count {
            out.push(read_tid(&item[base + TID_SIZE * i..]));
        }
    }

    pub fn set_neighbors(item: &mut [u8], m: usize, level: usize, ids: &[Id]) {
        let top = Self::level(item);
        let max = if level == 0 { 2 * m } else { m };
        let n = ids.len().min(max);
        item[2 + level] = n as u8;
        let base = 2 + (top + 1) + TID_SIZE * Self::slots_before(m, level);
        for (i, &id) in ids[..n].iter().enumerate() {
            write_tid(&mut item[base + TID_SIZE * i..], id);
        }
    }
}

// --- buffers -------------------------------------------------------------------------------

/// A pinned (and possibly locked) buffer. Released on drop, except while unwinding from an
/// ERROR: then PostgreSQL's abort processing releases pins and locks itself, and releasing
/// twice would corrupt its bookkeeping.
pub struct PinnedBuffer {
    pub buffer: pg_sys::Buffer,
    locked: bool,
}

impl PinnedBuffer {
    /// Reads `block` and locks it (`BUFFER_LOCK_SHARE` or `BUFFER_LOCK_EXCLUSIVE`).
    pub fn read(index: pg_sys::Relation, block: pg_sys::BlockNumber, lock: u32) -> PinnedBuffer {
        // Safety: `index` is an open relation; ReadBuffer raises an ERROR for a bad block.
        unsafe {
            let buffer = pg_sys::ReadBufferExtended(
                index,
                pg_sys::ForkNumber::MAIN_FORKNUM,
                block,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            pg_sys::LockBuffer(buffer, lock as i32);
            PinnedBuffer { buffer, locked: true }
        }
    }

    /// Owns a buffer pinned elsewhere (see [`super::buffers::RecentBuffers::pin`]).
    pub fn pinned(buffer: pg_sys::Buffer) -> PinnedBuffer {
        PinnedBuffer { buffer, locked: false }
    }

    /// Takes the lock of a buffer pinned with [`PinnedBuffer::pinned`].
    pub fn lock(&mut self, lock: u32) {
        debug_assert!(!self.locked);
        // Safety: we hold the pin.
        unsafe { pg_sys::LockBuffer(self.buffer, lock as i32) };
        self.locked = true;
    }

    /// Adds a new block at the end of `fork` and locks it exclusively.
    pub fn extend(index: pg_sys::Relation, fork: pg_sys::ForkNumber::Type, lock_extension: bool) -> PinnedBuffer {
        // Safety: as for `read`; the extension lock serialises concurrent extenders.
        unsafe {
            if lock_extension {
                pg_sys::LockRelationForExtension(index, pg_sys::ExclusiveLock as i32);
            }
            let buffer = pg_sys::ReadBufferExtended(
                index,
                fork,
                pg_sys::InvalidBlockNumber,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_EXCLUSIVE as i32);
            if lock_extension {
                pg_sys::UnlockRelationForExtension(index, pg_sys::ExclusiveLock as i32);
            }
            PinnedBuffer { buffer, locked: true }
        }
    }

    pub fn block(&self) -> pg_sys::BlockNumber {
        // Safety: a pinned buffer.
        unsafe { pg_sys::BufferGetBlockNumber(self.buffer) }
    }

    pub fn page(&self) -> pg_sys::Page {
        // Safety: a pinned buffer.
        unsafe { pg_sys::BufferGetPage(self.buffer) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // Safety: we hold the pin (and the lock when `locked`).
        unsafe {
            if self.locked {
                pg_sys::UnlockReleaseBuffer(self.buffer);
            } else {
                pg_sys::ReleaseBuffer(self.buffer);
            }
        }
    }
}

/// A GenericXLog record in progress. `finish` applies and logs it; dropping it unfinished
/// (an early return) aborts it, leaving the pages untouched. While unwinding from an ERROR
/// nothing is done: the state lives in a memory context that the abort frees.
///
/// During CREATE INDEX (`building`) pages are changed in place and only marked dirty: the
/// build WAL-logs every page once at its end, with `log_newpage_range`.
pub struct WalRecord {
    state: *mut pg_sys::GenericXLogState,
    building: bool,
    dirty: Vec<pg_sys::Buffer>,
}

impl WalRecord {
    pub fn start(index: pg_sys::Relation, building: bool) -> WalRecord {
        let state = if building {
            std::ptr::null_mut()
        } else {
            // Safety: `index` is open and we hold the buffer locks we will register.
            unsafe { pg_sys::GenericXLogStart(index) }
        };
        WalRecord { state, building, dirty: Vec::new() }
    }

    /// The page image to modify for `buf` (exclusively locked). `fresh` logs a full image.
    pub fn register(&mut self, buf: &PinnedBuffer, fresh: bool) -> pg_sys::Page {
        if self.building {
            self.dirty.push(buf.buffer);
            return buf.page();
        }
        let flags = if fresh { pg_sys::GENERIC_XLOG_FULL_IMAGE as i32 } else { 0 };
        // Safety: the state is live and the buffer exclusively locked.
        unsafe { pg_sys::GenericXLogRegisterBuffer(self.state, buf.buffer, flags) }
    }

    pub fn finish(mut self) {
        if self.building {
            for &b in &self.dirty {
                // Safety: registered buffers are pinned and exclusively locked.
                unsafe { pg_sys::MarkBufferDirty(b) };
            }
            return;
        }
        // Safety: the state is live; after this it is freed.
        unsafe { pg_sys::GenericXLogFinish(self.state) };
        self.state = std::ptr::null_mut();
    }
}

impl Drop for WalRecord {
    fn drop(&mut self) {
        if !self.state.is_null() && !std::thread::panicking() {
            // Safety: an unfinished, live state.
            unsafe { pg_sys::GenericXLogAbort(self.state) };
        }
    }
}

// --- page access -----------------------------------------------------------------------------

/// Initialises `page` as an index page of `kind`.
///
/// Safety: `page` points at a BLCKSZ buffer we may write.
pub unsafe fn init_page(page: pg_sys::Page, kind: u16) {
    // Safety: guaranteed by the caller.
    unsafe {
        pg_sys::PageInit(page, pg_sys::BLCKSZ as usize, size_of::<PageOpaque>());
        let opaque = pg_sys::PageGetSpecialPointer(page) as *mut PageOpaque;
        opaque.write(PageOpaque { kind, _pad: 0, magic: MAGIC });
    }
}

/// The meta struct of a meta page image.
///
/// Safety: `page` is a locked meta page (or its GenericXLog image).
pub unsafe fn meta_mut<'a>(page: pg_sys::Page) -> &'a mut Meta {
    // Safety: the contents area is MAXALIGNed and large enough.
    unsafe { &mut *(pg_sys::PageGetContents(page) as *mut Meta) }
}

/// Writes `meta` into a meta page image and makes it part of the page's logged contents.
///
/// Safety: as for [`meta_mut`].
pub unsafe fn write_meta(page: pg_sys::Page, meta: Meta) {
    // Safety: guaranteed by the caller.
    unsafe {
        *meta_mut(page) = meta;
        let header = page as *mut pg_sys::PageHeaderData;
        (*header).pd_lower = (pg_sys::PageGetContents(page) as usize - page as usize + size_of::<Meta>()) as u16;
    }
}

/// Reads the meta page.
pub fn read_meta(index: pg_sys::Relation) -> Meta {
    let buf = PinnedBuffer::read(index, META_BLOCK, pg_sys::BUFFER_LOCK_SHARE);
    // Safety: block 0 of an hnsw index is its meta page.
    let meta = unsafe { *meta_mut(buf.page()) };
    if meta.magic != MAGIC {
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_INDEX_CORRUPTED,
            "index is not a valid lorag hnsw index (bad meta page)",
            "REINDEX the index."
        );
    }
    if meta.version != VERSION {
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("hnsw index format version {} is not supported by this lorag", meta.version),
            "REINDEX the index."
        );
    }
    meta
}

/// The bytes of item `offset` on `page`, or None when there is no such (used) item.
///
/// Safety: `page` is a locked page that outlives the returned slice.
pub unsafe fn item<'a>(page: pg_sys::Page, offset: pg_sys::OffsetNumber) -> Option<&'a mut [u8]> {
    // Safety: guaranteed by the caller; the offset is checked against the line pointer array.
    unsafe {
        if offset == 0 || offset > pg_sys::PageGetMaxOffsetNumber(page) {
            return None;
        }
        let id = pg_sys::PageGetItemId(page, offset);
        if (*id).lp_flags() != pg_sys::LP_NORMAL {
            return None;
        }
        let ptr = pg_sys::PageGetItem(page, id) as *mut u8;
        Some(std::slice::from_raw_parts_mut(ptr, (*id).lp_len() as usize))
    }
}

/// Adds an item; returns its offset, or None when the page is full.
///
/// Safety: `page` is a page image we may modify.
pub unsafe fn add_item(page: pg_sys::Page, bytes: &[u8]) -> Option<pg_sys::OffsetNumber> {
    // Safety: guaranteed by the caller.
    let off = unsafe {
        pg_sys::PageAddItemExtended(page, bytes.as_ptr() as pg_sys::Item, bytes.len(), pg_sys::InvalidOffsetNumber, 0)
    };
    (off != pg_sys::InvalidOffsetNumber).then_some(off)
}

/// Free bytes on a page for new items (line pointer included).
///
/// Safety: `page` is a locked page.
pub unsafe fn free_space(page: pg_sys::Page) -> usize {
    // Safety: guaranteed by the caller.
    unsafe { pg_sys::PageGetExactFreeSpace(page) }
}

/// True when `item` is an element item of an index with `dim` dimensions.
pub fn is_element(item: &[u8], dim: usize) -> bool {
    item.len() == element_size(dim) && item[0] == ELEMENT_KIND
}

/// The bytes of an element item: header, then the vector.
pub fn element_bytes(header: ElementHeader, vector: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; ELEMENT_HEADER];
    header.write(&mut bytes);
    for x in vector {
        bytes.extend_from_slice(&x.to_ne_bytes());
    }
    bytes
}

pub fn vector_of(item: &[u8], dim: usize) -> &[f32] {
    let bytes = &item[ELEMENT_HEADER..ELEMENT_HEADER + 4 * dim];
    // Safety: items start MAXALIGNed, so the vector at offset 16 is 4-byte aligned, and the
    // length was checked by the slice above.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, dim) }
}

pub fn number_of_blocks(index: pg_sys::Relation) -> pg_sys::BlockNumber {
    // Safety: an open relation.
    unsafe { pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM) }
}
