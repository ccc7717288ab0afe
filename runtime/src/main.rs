//! The `projector` binary: see [`projector::cli`].

fn main() -> std::process::ExitCode {
    projector::cli::main()
}
