//! Type I/O: text in/out, typmod in/out, binary receive/send, and the length coercion that
//! applies a column's `vector(n)` typmod.
//!
//! The binary form is pgvector's: int16 dim, int16 unused (0), then dim float4, all big-endian.

use super::{arg_vector, vector_datum};
use crate::error::{raise, OrRaise};
use crate::fmgr::{arg, arg_i32, sql_function};
use lorag_vector::{check_dim, check_finite, check_typmod, text, VectorError, MAX_DIM};
use pgrx::pg_sys;
use std::ffi::CStr;

/// A palloc'd NUL-terminated copy of `s`.
fn cstring_datum(s: &str) -> pg_sys::Datum {
    // Safety: palloc returns len + 1 bytes or raises an ERROR.
    unsafe {
        let ptr = pg_sys::palloc(s.len() + 1) as *mut u8;
        std::ptr::copy_nonoverlapping(s.as_ptr(), ptr, s.len());
        ptr.add(s.len()).write(0);
        pg_sys::Datum::from(ptr)
    }
}

// vector_in(cstring, oid, integer) → vector
sql_function!(lorag_vector_in, pg_finfo_lorag_vector_in, |fcinfo| {
    // Safety: argument 0 is a cstring.
    let input = unsafe { CStr::from_ptr(arg(fcinfo, 0).cast_mut_ptr()) };
    let typmod = unsafe { arg_i32(fcinfo, 2) };
    let input = input.to_str().unwrap_or_else(|_| {
        raise(VectorError::InvalidSyntax { input: input.to_string_lossy().into_owned(), detail: None })
    });
    let values = text::parse(input).or_raise();
    check_typmod(values.len(), typmod).or_raise();
    vector_datum(&values)
});

// vector_out(vector) → cstring
sql_function!(lorag_vector_out, pg_finfo_lorag_vector_out, |fcinfo| {
    let v = unsafe { arg_vector(fcinfo, 0) };
    cstring_datum(&text::format(v))
});

// vector_typmod_in(cstring[]) → integer
sql_function!(lorag_vector_typmod_in, pg_finfo_lorag_vector_typmod_in, |fcinfo| {
    let mut n: std::ffi::c_int = 0;
    // Safety: argument 0 is a cstring[]; ArrayGetIntegerTypmods validates it.
    let mods = unsafe { pg_sys::ArrayGetIntegerTypmods(arg(fcinfo, 0).cast_mut_ptr(), &mut n) };
    if n != 1 {
        raise(VectorError::TypmodInvalid);
    }
    // Safety: one element was returned.
    let dims = unsafe { *mods };
    if dims < 1 {
        raise(VectorError::TypmodTooSmall);
    }
    if dims as usize > MAX_DIM {
        raise(VectorError::TypmodTooLarge);
    }
    pg_sys::Datum::from(dims)
});

// vector_typmod_out(integer) → cstring
sql_function!(lorag_vector_typmod_out, pg_finfo_lorag_vector_typmod_out, |fcinfo| {
    let typmod = unsafe { arg_i32(fcinfo, 0) };
    cstring_datum(&if typmod >= 0 { format!("({typmod})") } else { String::new() })
});

// vector(vector, integer, boolean) → vector: the length coercion for `vector(n)` columns and casts.
sql_function!(lorag_vector, pg_finfo_lorag_vector, |fcinfo| {
    let v = unsafe { arg_vector(fcinfo, 0) };
    let typmod = unsafe { arg_i32(fcinfo, 1) };
    check_typmod(v.len(), typmod).or_raise();
    unsafe { arg(fcinfo, 0) }
});

/// Reads big-endian values off a StringInfo, as pq_getmsg* do, with bounds checks.
struct Message {
    buf: pg_sys::StringInfo,
}

impl Message {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Safety: `buf` is the receive function's StringInfo; we stay inside `len`.
        unsafe {
            let b = &mut *self.buf;
            if b.cursor as usize + N > b.len as usize {
                pgrx::ereport!(
                    ERROR,
                    pgrx::PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
                    "insufficient data left in message"
                );
            }
            let mut out = [0u8; N];
            std::ptr::copy_nonoverlapping(b.data.add(b.cursor as usize) as *const u8, out.as_mut_ptr(), N);
            b.cursor += N as i32;
            out
        }
    }
}

// vector_recv(internal, oid, integer) → vector
sql_function!(lorag_vector_recv, pg_finfo_lorag_vector_recv, |fcinfo| {
    let mut msg = Message { buf: unsafe { arg(fcinfo, 0) }.cast_mut_ptr() };
    let typmod = unsafe { arg_i32(fcinfo, 2) };
    let dim = i16::from_be_bytes(msg.take());
    let unused = i16::from_be_bytes(msg.take());
    if dim < 0 {
        raise(VectorError::Empty);
    }
    check_dim(dim as usize).or_raise();
    check_typmod(dim as usize, typmod).or_raise();
    if unused != 0 {
        raise(VectorError::UnusedNotZero);
    }
    let values: Vec<f32> = (0..dim).map(|_| f32::from_be_bytes(msg.take())).collect();
    check_finite(&values).or_raise();
    vector_datum(&values)
});

// vector_send(vector) → bytea
sql_function!(lorag_vector_send, pg_finfo_lorag_vector_send, |fcinfo| {
    let v = unsafe { arg_vector(fcinfo, 0) };
    let mut bytes = Vec::with_capacity(4 + 4 * v.len());
    bytes.extend((v.len() as i16).to_be_bytes());
    bytes.extend(0i16.to_be_bytes());
    for x in v {
        bytes.extend(x.to_be_bytes());
    }
    // Safety: palloc returns the bytes asked for or raises an ERROR.
    unsafe {
        let size = pg_sys::VARHDRSZ + bytes.len();
        let ptr = pg_sys::palloc(size) as *mut u8;
        pgrx::set_varsize_4b(ptr as *mut pg_sys::varlena, size as i32);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.add(pg_sys::VARHDRSZ), bytes.len());
        pg_sys::Datum::from(ptr)
    }
});
