//! The one place where internal errors become PostgreSQL ERRORs (STYLE.md §4).

use lorag_vector::error::ErrorClass;
use lorag_vector::VectorError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

fn sqlstate(class: ErrorClass) -> PgSqlErrorCode {
    match class {
        ErrorClass::InvalidTextRepresentation => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        ErrorClass::NumericValueOutOfRange => PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        ErrorClass::DataException => PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
        ErrorClass::ProgramLimitExceeded => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        ErrorClass::NullValueNotAllowed => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        ErrorClass::InvalidParameterValue => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorClass::InvalidBinaryRepresentation => {
            PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION
        }
    }
}

/// Raises `e` as an ERROR with its SQLSTATE, detail and hint.
pub fn raise(e: VectorError) -> ! {
    let mut report = ErrorReport::new(sqlstate(e.class()), e.to_string(), "lorag");
    if let Some(detail) = e.detail() {
        report = report.set_detail(detail);
    }
    if let Some(hint) = e.hint() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR returns by unwinding")
}

/// `result?`, but at the SQL boundary: an `Err` becomes an ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, VectorError> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| raise(e))
    }
}
