//! Exit codes (SPEC §2) and the two ways a command reports an error.

pub const EXIT_OK: i32 = 0;
pub const EXIT_RUNTIME: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// Print `error: …` and return the runtime-failure code.
pub fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("error: {e}");
    EXIT_RUNTIME
}

/// Print `error: …` and return the usage-error code.
pub fn usage(e: impl std::fmt::Display) -> i32 {
    eprintln!("error: {e}");
    EXIT_USAGE
}
