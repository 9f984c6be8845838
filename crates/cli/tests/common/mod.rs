//! Helpers shared by this crate's integration tests. The real-tokenizer model
//! builder is the engine tests' one (a single source of truth).
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::process::{Command, Output, Stdio};

#[path = "../../../engine/tests/common/realtok.rs"]
pub mod realtok;

/// Runs the built `dsv4` binary with `args`, feeding `stdin` when given.
pub fn dsv4(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dsv4"));
    c.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn dsv4");
    let mut inp = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        inp.write_all(s.as_bytes()).unwrap();
    }
    drop(inp);
    child.wait_with_output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
