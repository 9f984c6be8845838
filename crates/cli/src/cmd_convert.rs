//! `dsv4 convert` / `download` / `imatrix` (placeholder while the model-tools issue is in progress).
use anyhow::{bail, Result};
use clap::Args;
#[derive(Args)]
pub struct ConvertArgs {}
#[derive(Args)]
pub struct DownloadArgs {}
#[derive(Args)]
pub struct ImatrixArgs {}
pub fn convert(_a: ConvertArgs) -> Result<()> {
    bail!("`dsv4 convert` is not implemented yet")
}
pub fn download(_a: DownloadArgs) -> Result<()> {
    bail!("`dsv4 download` is not implemented yet")
}
pub fn imatrix(_a: ImatrixArgs) -> Result<()> {
    bail!("`dsv4 imatrix` is not implemented yet")
}
