//! `palisade`: a runc-compatible command line for the palisade OCI runtime.

#[path = "../cli/mod.rs"]
mod cli;

fn main() {
    std::process::exit(cli::main());
}
