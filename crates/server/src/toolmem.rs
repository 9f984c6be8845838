//! Memory of the exact DSML the model sampled, keyed by the tool-call ids the
//! server handed out. When a client sends the conversation back, assistant
//! tool calls with known ids are re-rendered from these bytes rather than from
//! canonical JSON, so the prompt is byte-identical to what the live KV cache
//! holds and the prefix is reused. Bounded: oldest blocks are evicted first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Block {
    ids: Vec<String>,
    text: String,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Arc<Block>>,
    order: VecDeque<String>,
}

#[derive(Debug)]
pub struct ToolMemory {
    max_ids: usize,
    inner: Mutex<Inner>,
}

impl ToolMemory {
    pub fn new(max_ids: usize) -> Self {
        ToolMemory { max_ids, inner: Mutex::default() }
    }

    /// Remembers one sampled block (`\n\n<｜DSML｜tool_calls>…</｜DSML｜tool_calls>`) for its calls' ids.
    pub fn remember(&self, ids: Vec<String>, text: String) {
        if self.max_ids == 0 {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        let block = Arc::new(Block { ids: ids.clone(), text });
        for id in ids {
            g.order.push_back(id.clone());
            g.by_id.insert(id, block.clone());
        }
        while g.order.len() > self.max_ids {
            if let Some(old) = g.order.pop_front() {
                g.by_id.remove(&old);
            }
        }
    }

    /// The exact block whose calls are exactly `ids`, in order.
    pub fn block_for(&self, ids: &[&str]) -> Option<String> {
        let g = self.inner.lock().ok()?;
        let b = g.by_id.get(*ids.first()?)?;
        (b.ids.len() == ids.len() && b.ids.iter().zip(ids).all(|(a, b)| a == b)).then(|| b.text.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.by_id.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_exact() {
        let m = ToolMemory::new(3);
        m.remember(vec!["a".into(), "b".into()], "AB".into());
        assert_eq!(m.block_for(&["a", "b"]).as_deref(), Some("AB"));
        assert_eq!(m.block_for(&["a"]), None);
        m.remember(vec!["c".into(), "d".into()], "CD".into());
        assert_eq!(m.block_for(&["a", "b"]), None, "a was evicted");
        assert_eq!(m.block_for(&["c", "d"]).as_deref(), Some("CD"));
        assert!(m.len() <= 3);
    }
}
