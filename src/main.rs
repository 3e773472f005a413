//! `session-worker`: parses the command line and hands over to the library.

/// glibc's malloc, or mimalloc while a pod catches up on a long ledger (`alloc`).
#[global_allocator]
static ALLOCATOR: session_worker::alloc::PhaseAlloc = session_worker::alloc::PhaseAlloc;

fn main() {
    // Before any thread exists: every thread of this process gets a stack deep enough for the
    // most deeply nested AMQP headers a frame can carry (see `cli::THREAD_STACK`).
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var(
            "RUST_MIN_STACK",
            session_worker::cli::THREAD_STACK.to_string(),
        );
    }
    std::process::exit(session_worker::cli::main());
}
