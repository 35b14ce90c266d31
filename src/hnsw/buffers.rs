//! Reading an index's pages through the buffer each block was last found in.
//!
//! A search reads a few thousand pages per query, and an ordinary `ReadBuffer` looks each one up
//! in the shared buffer mapping table: a hash probe and a partition lock whose cache misses were
//! a quarter of a search's time. A backend remembers, per index and block, the buffer that held
//! the block, and asks `ReadRecentBuffer` for it: that checks the guess under the buffer header's
//! spinlock (right relation, fork and block, valid) and pins it, or says no, and then the block
//! is read the ordinary way and the new buffer remembered. A wrong guess therefore costs one
//! extra check and can never return the wrong page. Knowing the buffer ahead also lets a search
//! prefetch the buffer headers and line pointers of all the pages it is about to read.
//!
//! Temporary indexes are read the ordinary way: their local buffers' tags do not say whose
//! they are, and a temporary and a permanent index can share a file number, so a remembered
//! local buffer could pass the check for the other index's block.

use pgrx::pg_sys;
use std::cell::RefCell;

/// Blocks past this are read the ordinary way (a 32 GB index's buffers take 16 MB to remember).
const MAX_BLOCKS: usize = 1 << 22;
/// Indexes whose buffers a backend remembers at once.
const INDEXES: usize = 8;

#[cfg(any(feature = "pg14", feature = "pg15"))]
type FileKey = pg_sys::RelFileNode;
#[cfg(any(feature = "pg16", feature = "pg17"))]
type FileKey = pg_sys::RelFileLocator;

type Key = (pg_sys::Oid, pg_sys::Oid, u32);

thread_local! {
    /// The backend's remembered buffers, most recently used index last.
    static REMEMBERED: RefCell<Vec<(Key, Vec<pg_sys::Buffer>)>> = const { RefCell::new(Vec::new()) };
}

/// The relation's physical file: what `ReadRecentBuffer` and the remembered buffers are keyed by.
fn file_of(index: pg_sys::Relation) -> (FileKey, Key) {
    // Safety: `index` is an open relation.
    let file = unsafe {
        #[cfg(any(feature = "pg14", feature = "pg15"))]
        {
            (*index).rd_node
        }
        #[cfg(any(feature = "pg16", feature = "pg17"))]
        {
            (*index).rd_locator
        }
    };
    #[cfg(any(feature = "pg14", feature = "pg15"))]
    let key = (file.spcNode, file.dbNode, u32::from(file.relNode));
    #[cfg(any(feature = "pg16", feature = "pg17"))]
    let key = (file.spcOid, file.dbOid, u32::from(file.relNumber));
    (file, key)
}

/// One index's remembered buffers, borrowed from the backend while a scan, insert or VACUUM
/// uses the index, and given back when it is dropped.
pub struct RecentBuffers {
    index: pg_sys::Relation,
    file: FileKey,
    key: Key,
    /// False for a temporary index: nothing is remembered.
    remember: bool,
    buffers: RefCell<Vec<pg_sys::Buffer>>,
}

impl RecentBuffers {
    pub fn open(index: pg_sys::Relation) -> RecentBuffers {
        let (file, key) = file_of(index);
        // Safety: an open relation has its pg_class row.
        let remember = unsafe { (*(*index).rd_rel).relpersistence } as u8 != pg_sys::RELPERSISTENCE_TEMP;
        let buffers = if remember {
            REMEMBERED.with_borrow_mut(|all| match all.iter().position(|(k, _)| *k == key) {
                Some(i) => all.remove(i).1,
                None => Vec::new(),
            })
        } else {
            Vec::new()
        };
        RecentBuffers { index, file, key, remember, buffers: RefCell::new(buffers) }
    }

    fn guess(&self, block: pg_sys::BlockNumber) -> pg_sys::Buffer {
        self.buffers.borrow().get(block as usize).copied().unwrap_or(pg_sys::InvalidBuffer as pg_sys::Buffer)
    }

    /// Asks the CPU to fetch the buffer header of `block`'s remembered buffer and the line
    /// pointer of item `offset` on its page (hints: a stale guess only wastes the fetch). Only
    /// on x86_64: stable Rust has no prefetch elsewhere.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn prefetch(&self, block: pg_sys::BlockNumber, offset: pg_sys::OffsetNumber) {
        let buffer = self.guess(block);
        if buffer <= 0 {
            return; // unknown, or a local buffer of a temporary index
        }
        #[cfg(target_arch = "x86_64")]
        // Safety: addresses inside the shared buffer arrays (the guess is a buffer number this
        // backend was given); a prefetch never faults anyway.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let i = (buffer - 1) as usize;
            _mm_prefetch::<_MM_HINT_T0>(pg_sys::BufferDescriptors.wrapping_add(i) as *const i8);
            let page = pg_sys::BufferBlocks.wrapping_add(i * pg_sys::BLCKSZ as usize);
            let line_pointer = super::page::size_of_page_header() + 4 * (offset as usize).saturating_sub(1);
            _mm_prefetch::<_MM_HINT_T0>(page.wrapping_add(line_pointer) as *const i8);
        }
    }

    /// Pins `block` (not locked): through its remembered buffer when that still holds it.
    pub fn pin(&self, block: pg_sys::BlockNumber) -> pg_sys::Buffer {
        let guess = self.guess(block);
        // Safety: the index is open; ReadRecentBuffer validates the guess under the buffer
        // header lock and pins only a buffer holding exactly this block.
        unsafe {
            if guess != pg_sys::InvalidBuffer as pg_sys::Buffer
                && pg_sys::ReadRecentBuffer(self.file, pg_sys::ForkNumber::MAIN_FORKNUM, block, guess)
            {
                self.count_hit();
                return guess;
            }
            let buffer = pg_sys::ReadBufferExtended(
                self.index,
                pg_sys::ForkNumber::MAIN_FORKNUM,
                block,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            if self.remember && (block as usize) < MAX_BLOCKS {
                let mut buffers = self.buffers.borrow_mut();
                if buffers.len() <= block as usize {
                    buffers.resize(block as usize + 1, pg_sys::InvalidBuffer as pg_sys::Buffer);
                }
                buffers[block as usize] = buffer;
            }
            buffer
        }
    }

    /// Counts a block read from shared buffers in the index's statistics, as `ReadBuffer` does
    /// (`pg_statio_all_indexes.idx_blks_hit`; `ReadRecentBuffer` counts only the query's
    /// buffer usage). Every user reads the meta page with `ReadBuffer` first, which ties the
    /// relation to its statistics entry.
    fn count_hit(&self) {
        // Safety: an open relation; its statistics entry, when there is one, lives as long.
        unsafe {
            let stats = (*self.index).pgstat_info;
            if stats.is_null() {
                return;
            }
            #[cfg(any(feature = "pg14", feature = "pg15"))]
            let counts = &mut (*stats).t_counts;
            #[cfg(any(feature = "pg14", feature = "pg15"))]
            {
                counts.t_blocks_fetched += 1;
                counts.t_blocks_hit += 1;
            }
            #[cfg(any(feature = "pg16", feature = "pg17"))]
            let counts = &mut (*stats).counts;
            #[cfg(any(feature = "pg16", feature = "pg17"))]
            {
                counts.blocks_fetched += 1;
                counts.blocks_hit += 1;
            }
        }
    }
}

impl Drop for RecentBuffers {
    fn drop(&mut self) {
        if !self.remember {
            return;
        }
        let buffers = std::mem::take(self.buffers.get_mut());
        REMEMBERED.with_borrow_mut(|all| {
            all.retain(|(k, _)| *k != self.key); // a nested user of the same index gave its copy back
            if all.len() >= INDEXES {
                all.remove(0);
            }
            all.push((self.key, buffers));
        });
    }
}
