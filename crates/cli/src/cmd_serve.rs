//! `dsv4 serve` (placeholder while the server issue is in progress).
use anyhow::{bail, Result};
use clap::Args;
#[derive(Args)]
pub struct ServeArgs {}
pub fn run(_a: ServeArgs) -> Result<()> {
    bail!("`dsv4 serve` is not implemented yet")
}
