//! Version-1 function-manager plumbing for functions whose SQL is hand-written.

use pgrx::pg_sys;

/// Declares a V1 C function callable from SQL as `AS 'MODULE_PATHNAME', 'name'`: the
/// `pg_finfo_name` record PostgreSQL looks up with `dlsym`, and the function itself under
/// `#[pg_guard]`, so a Rust panic or an ERROR raised inside unwinds into a PostgreSQL ERROR.
/// Symbols carry a `lorag_` prefix: PostgreSQL loads libraries with `RTLD_GLOBAL`, and
/// pgvector's C symbols must never be shadowed.
macro_rules! sql_function {
    ($name:ident, $finfo:ident, |$fcinfo:ident| $body:block) => {
        #[no_mangle]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            const V1_API: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1_API
        }

        #[::pgrx::pg_guard]
        #[no_mangle]
        pub unsafe extern "C-unwind" fn $name(
            fcinfo: ::pgrx::pg_sys::FunctionCallInfo,
        ) -> ::pgrx::pg_sys::Datum {
            #[allow(unused_unsafe)]
            fn body($fcinfo: ::pgrx::pg_sys::FunctionCallInfo) -> ::pgrx::pg_sys::Datum $body
            body(fcinfo)
        }
    };
}
pub(crate) use sql_function;

/// Argument `n` as a raw datum.
///
/// Safety: `fcinfo` is the call's, and the function was declared with more than `n` arguments.
pub unsafe fn arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> pg_sys::Datum {
    // Safety: guaranteed by the caller.
    unsafe { pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n) }
}

/// Argument `n` as an `int4`.
///
/// Safety: as for [`arg`], and argument `n` is an `int4`.
pub unsafe fn arg_i32(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> i32 {
    // Safety: guaranteed by the caller.
    unsafe { arg(fcinfo, n) }.value() as i32
}

/// Argument `n` is SQL NULL.
///
/// Safety: as for [`arg`].
pub unsafe fn arg_is_null(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> bool {
    // Safety: guaranteed by the caller.
    unsafe { pgrx::fcinfo::pg_arg_is_null(fcinfo, n) }
}
