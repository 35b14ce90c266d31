//! `avg(vector)`: state is pgvector's `double precision[]` {count, sum_1, ..., sum_dim}.
//! `sum(vector)` needs no code of its own: it folds with `vector_add`.

use super::{arg_vector, vector_datum};
use crate::error::OrRaise;
use crate::fmgr::{arg_is_null, sql_function};
use lorag_vector::ops;
use pgrx::{pg_sys, IntoDatum};

/// Safety: argument `n` of the call is a `double precision[]` without NULLs.
unsafe fn state_arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Vec<f64> {
    // Safety: guaranteed by the caller.
    unsafe { pgrx::fcinfo::pg_getarg::<Vec<f64>>(fcinfo, n) }.unwrap_or_default()
}

fn state_datum(state: Vec<f64>) -> pg_sys::Datum {
    state.into_datum().expect("an array of floats is never NULL")
}

// vector_accum(double precision[], vector) → double precision[]
sql_function!(lorag_vector_accum, pg_finfo_lorag_vector_accum, |fcinfo| {
    let mut state = unsafe { state_arg(fcinfo, 0) };
    let v = unsafe { arg_vector(fcinfo, 1) };
    ops::accumulate(&mut state, v).or_raise();
    state_datum(state)
});

// vector_combine(double precision[], double precision[]) → double precision[]
sql_function!(lorag_vector_combine, pg_finfo_lorag_vector_combine, |fcinfo| {
    let (a, b) = unsafe { (state_arg(fcinfo, 0), state_arg(fcinfo, 1)) };
    state_datum(ops::combine(&a, &b).or_raise())
});

// vector_avg(double precision[]) → vector, NULL when no row was aggregated
sql_function!(lorag_vector_avg, pg_finfo_lorag_vector_avg, |fcinfo| {
    let state = if unsafe { arg_is_null(fcinfo, 0) } { Vec::new() } else { unsafe { state_arg(fcinfo, 0) } };
    match ops::average(&state).or_raise() {
        Some(avg) => vector_datum(&avg),
        None => unsafe { pgrx::fcinfo::pg_return_null(fcinfo) },
    }
});
