//! `session-worker`: parses the command line and hands over to the library.

fn main() {
    std::process::exit(session_worker::cli::main());
}
