//! Helpers shared by this crate's integration tests. The real-tokenizer model
//! builder is the engine tests' one (a single source of truth).
#[path = "../../../engine/tests/common/realtok.rs"]
pub mod realtok;
