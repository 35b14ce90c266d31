//! The `vector` datum: pgvector's on-disk layout, byte for byte.
//!
//! ```text
//! int32 vl_len_   varlena header (4-byte form; STORAGE external, so never compressed)
//! int16 dim       number of elements
//! int16 unused    always 0
//! float4 x[dim]
//! ```

use pgrx::pg_sys;
use std::marker::PhantomData;

mod agg;
mod cast;
mod io;
mod ops;

/// Bytes before the first element.
pub const HEADER_SIZE: usize = 8;

/// A detoasted vector argument, borrowed for the current call.
pub struct VectorRef<'a> {
    ptr: *const u8,
    _call: PhantomData<&'a ()>,
}

impl<'a> VectorRef<'a> {
    /// Safety: `datum` is a non-null `vector` datum that lives for `'a` (the current call).
    pub unsafe fn from_datum(datum: pg_sys::Datum) -> Self {
        // Safety: a vector datum is a varlena; detoasting returns a 4-byte-header copy or itself.
        let ptr = unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) } as *const u8;
        VectorRef { ptr, _call: PhantomData }
    }

    pub fn dim(&self) -> usize {
        // Safety: the header is at least 8 bytes in every vector datum.
        unsafe { (self.ptr.add(4) as *const i16).read() }.max(0) as usize
    }

    /// The detoasted datum (differs from the argument when detoasting made a copy).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &'a [f32] {
        // Safety: `dim` float4s follow the header, 4-byte aligned (typalign 'i').
        unsafe { std::slice::from_raw_parts(self.ptr.add(HEADER_SIZE) as *const f32, self.dim()) }
    }
}

/// Vector argument `n` of the call.
///
/// Safety: `fcinfo` is the call's and argument `n` is a non-null `vector`.
pub unsafe fn arg_vector<'a>(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> &'a [f32] {
    // Safety: guaranteed by the caller.
    unsafe { VectorRef::from_datum(crate::fmgr::arg(fcinfo, n)) }.as_slice()
}

/// A new vector datum holding `values`, palloc'd in the current memory context. The caller has
/// checked the dimension count.
pub fn vector_datum(values: &[f32]) -> pg_sys::Datum {
    debug_assert!(!values.is_empty() && values.len() <= lorag_vector::MAX_DIM);
    let size = HEADER_SIZE + 4 * values.len();
    // Safety: palloc0 returns `size` zeroed bytes, MAXALIGNed, or raises an ERROR.
    unsafe {
        let ptr = pg_sys::palloc0(size) as *mut u8;
        pgrx::set_varsize_4b(ptr as *mut pg_sys::varlena, size as i32);
        (ptr.add(4) as *mut i16).write(values.len() as i16);
        std::ptr::copy_nonoverlapping(values.as_ptr(), ptr.add(HEADER_SIZE) as *mut f32, values.len());
        pg_sys::Datum::from(ptr)
    }
}

/// A float8 result.
pub fn float8_datum(v: f64) -> pg_sys::Datum {
    pg_sys::Datum::from(v.to_bits())
}
