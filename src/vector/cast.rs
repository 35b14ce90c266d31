//! Casts between `vector` and arrays. Array → vector takes `integer[]`, `real[]`,
//! `double precision[]` and `numeric[]` (one function, dispatching on the element type, as
//! pgvector does); vector → `real[]` is here, and the other array types are cast from `real[]`
//! in SQL.

use super::{arg_vector, vector_datum};
use crate::error::{raise, OrRaise};
use crate::fmgr::{arg, arg_i32, sql_function};
use lorag_vector::{check_dim, check_finite, check_typmod, VectorError};
use pgrx::{pg_sys, IntoDatum};

/// The elements of a one-dimensional array of int4, float4, float8 or numeric as float4.
///
/// Safety: `datum` is a non-null array datum.
unsafe fn array_elements(datum: pg_sys::Datum) -> Vec<f32> {
    // Safety: an array datum is a varlena; detoasting gives a plain ArrayType.
    let array = unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) } as *mut pg_sys::ArrayType;
    let (ndim, elemtype) = unsafe { ((*array).ndim, (*array).elemtype) };
    if ndim > 1 {
        raise(VectorError::NotOneDimensional);
    }
    let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
    let (mut elems, mut nulls, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
    // Safety: the out-pointers are valid; deconstruct_array pallocs the arrays it returns.
    unsafe {
        pg_sys::get_typlenbyvalalign(elemtype, &mut len, &mut byval, &mut align);
        pg_sys::deconstruct_array(array, elemtype, len as i32, byval, align, &mut elems, &mut nulls, &mut n);
    }
    let n = n.max(0) as usize;
    // Safety: deconstruct_array returned n datums and n null flags.
    let (elems, nulls) = unsafe {
        (std::slice::from_raw_parts(elems, n), std::slice::from_raw_parts(nulls, n))
    };
    if nulls.iter().any(|&isnull| isnull) {
        raise(VectorError::NullElement);
    }
    let convert: fn(pg_sys::Datum) -> f32 = match elemtype {
        pg_sys::INT4OID => |d| d.value() as i32 as f32,
        pg_sys::FLOAT4OID => |d| f32::from_bits(d.value() as u32),
        pg_sys::FLOAT8OID => |d| f64::from_bits(d.value() as u64) as f32,
        pg_sys::NUMERICOID => |d| {
            // Safety: numeric_float4 takes one numeric and raises its own range errors.
            unsafe { pgrx::fcinfo::direct_function_call::<f32>(pg_sys::numeric_float4, &[Some(d)]) }
                .expect("numeric_float4 never returns NULL for a non-null input")
        },
        other => raise(VectorError::UnsupportedArrayType(format!("oid {}", other.to_u32()))),
    };
    elems.iter().map(|&d| convert(d)).collect()
}

// array_to_vector(integer[] | real[] | double precision[] | numeric[], integer, boolean) → vector
sql_function!(lorag_array_to_vector, pg_finfo_lorag_array_to_vector, |fcinfo| {
    let values = unsafe { array_elements(arg(fcinfo, 0)) };
    let typmod = unsafe { arg_i32(fcinfo, 1) };
    check_dim(values.len()).or_raise();
    check_finite(&values).or_raise();
    check_typmod(values.len(), typmod).or_raise();
    vector_datum(&values)
});

// vector_to_float4(vector, integer, boolean) → real[]
sql_function!(lorag_vector_to_float4, pg_finfo_lorag_vector_to_float4, |fcinfo| {
    let v = unsafe { arg_vector(fcinfo, 0) };
    v.to_vec().into_datum().expect("an array of floats is never NULL")
});
