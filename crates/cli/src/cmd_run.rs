//! `dsv4 run` / `dsv4 chat` (placeholder while the session issue is in progress).
use anyhow::{bail, Result};
use clap::Args;
#[derive(Args)]
pub struct RunArgs {}
#[derive(Args)]
pub struct ChatArgs {}
pub fn run(_a: RunArgs) -> Result<()> {
    bail!("`dsv4 run` is not implemented yet")
}
pub fn chat(_a: ChatArgs) -> Result<()> {
    bail!("`dsv4 chat` is not implemented yet")
}
