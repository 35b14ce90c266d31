//! Distances, arithmetic, norms, comparison and sub-vectors.

use super::{arg_vector, float8_datum, vector_datum};
use crate::error::OrRaise;
use crate::fmgr::{arg_i32, sql_function};
use lorag_vector::kernels::{cosine_distance_from_parts, kernels};
use lorag_vector::{check_same_dim, ops};
use pgrx::pg_sys;
use std::cmp::Ordering;

/// Both vector arguments, checked to have the same dimensions.
///
/// Safety: arguments 0 and 1 of the call are non-null vectors.
unsafe fn two_vectors<'a>(fcinfo: pg_sys::FunctionCallInfo) -> (&'a [f32], &'a [f32]) {
    // Safety: guaranteed by the caller.
    let (a, b) = unsafe { (arg_vector(fcinfo, 0), arg_vector(fcinfo, 1)) };
    check_same_dim(a, b).or_raise();
    (a, b)
}

macro_rules! distance_function {
    ($name:ident, $finfo:ident, |$a:ident, $b:ident| $expr:expr) => {
        sql_function!($name, $finfo, |fcinfo| {
            let ($a, $b) = unsafe { two_vectors(fcinfo) };
            float8_datum($expr)
        });
    };
}

distance_function!(lorag_l2_distance, pg_finfo_lorag_l2_distance, |a, b| {
    ((kernels().l2_squared)(a, b) as f64).sqrt()
});
distance_function!(lorag_vector_l2_squared_distance, pg_finfo_lorag_vector_l2_squared_distance, |a, b| {
    (kernels().l2_squared)(a, b) as f64
});
distance_function!(lorag_inner_product, pg_finfo_lorag_inner_product, |a, b| {
    (kernels().dot)(a, b) as f64
});
distance_function!(lorag_vector_negative_inner_product, pg_finfo_lorag_vector_negative_inner_product, |a, b| {
    -((kernels().dot)(a, b) as f64)
});
distance_function!(lorag_cosine_distance, pg_finfo_lorag_cosine_distance, |a, b| {
    cosine_distance_from_parts((kernels().cosine_parts)(a, b))
});
distance_function!(lorag_l1_distance, pg_finfo_lorag_l1_distance, |a, b| {
    (kernels().l1)(a, b) as f64
});

macro_rules! arithmetic_function {
    ($name:ident, $finfo:ident, $op:path) => {
        sql_function!($name, $finfo, |fcinfo| {
            let (a, b) = unsafe { (arg_vector(fcinfo, 0), arg_vector(fcinfo, 1)) };
            vector_datum(&$op(a, b).or_raise())
        });
    };
}

arithmetic_function!(lorag_vector_add, pg_finfo_lorag_vector_add, ops::add);
arithmetic_function!(lorag_vector_sub, pg_finfo_lorag_vector_sub, ops::sub);
arithmetic_function!(lorag_vector_mul, pg_finfo_lorag_vector_mul, ops::mul);
arithmetic_function!(lorag_vector_concat, pg_finfo_lorag_vector_concat, ops::concat);

sql_function!(lorag_vector_dims, pg_finfo_lorag_vector_dims, |fcinfo| {
    pg_sys::Datum::from(unsafe { arg_vector(fcinfo, 0) }.len() as i32)
});

sql_function!(lorag_vector_norm, pg_finfo_lorag_vector_norm, |fcinfo| {
    float8_datum(ops::norm(unsafe { arg_vector(fcinfo, 0) }))
});

sql_function!(lorag_l2_normalize, pg_finfo_lorag_l2_normalize, |fcinfo| {
    vector_datum(&ops::l2_normalize(unsafe { arg_vector(fcinfo, 0) }).or_raise())
});

sql_function!(lorag_subvector, pg_finfo_lorag_subvector, |fcinfo| {
    let v = unsafe { arg_vector(fcinfo, 0) };
    let (start, count) = unsafe { (arg_i32(fcinfo, 1), arg_i32(fcinfo, 2)) };
    vector_datum(ops::subvector(v, start, count).or_raise())
});

sql_function!(lorag_vector_cmp, pg_finfo_lorag_vector_cmp, |fcinfo| {
    let (a, b) = unsafe { (arg_vector(fcinfo, 0), arg_vector(fcinfo, 1)) };
    pg_sys::Datum::from(ops::compare(a, b) as i32)
});

macro_rules! comparison_function {
    ($name:ident, $finfo:ident, $pred:expr) => {
        sql_function!($name, $finfo, |fcinfo| {
            let (a, b) = unsafe { (arg_vector(fcinfo, 0), arg_vector(fcinfo, 1)) };
            let pred: fn(Ordering) -> bool = $pred;
            pg_sys::Datum::from(pred(ops::compare(a, b)))
        });
    };
}

comparison_function!(lorag_vector_lt, pg_finfo_lorag_vector_lt, |o| o.is_lt());
comparison_function!(lorag_vector_le, pg_finfo_lorag_vector_le, |o| o.is_le());
comparison_function!(lorag_vector_eq, pg_finfo_lorag_vector_eq, |o| o.is_eq());
comparison_function!(lorag_vector_ne, pg_finfo_lorag_vector_ne, |o| o.is_ne());
comparison_function!(lorag_vector_ge, pg_finfo_lorag_vector_ge, |o| o.is_ge());
comparison_function!(lorag_vector_gt, pg_finfo_lorag_vector_gt, |o| o.is_gt());
