//! Generates the protobuf messages and async ttrpc stubs from protos/agent.proto with the
//! pure-Rust parser (no `protoc` needed).

use std::{fs, io, path::Path};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const GENERATED: [&str; 2] = ["agent.rs", "agent_ttrpc.rs"];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out_dir = std::env::var("OUT_DIR").map_err(io::Error::other)?;
    Codegen::new()
        .out_dir(&out_dir)
        .input("protos/agent.proto")
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // The generated files are written as standalone modules: they open with inner
    // attributes (`#![allow(..)]`) and inner doc comments, which `include!` cannot take.
    // lib.rs puts the equivalent allows on the wrapping modules instead.
    for name in GENERATED {
        strip_inner_attributes(&Path::new(&out_dir).join(name))?;
    }
    Ok(())
}

fn strip_inner_attributes(path: &Path) -> io::Result<()> {
    let text = fs::read_to_string(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            !(line.starts_with("#![") || line.starts_with("//!"))
        })
        .collect();
    fs::write(path, kept.join("\n") + "\n")
}
