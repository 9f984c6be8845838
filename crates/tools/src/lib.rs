//! Model tools (being written; see issue 7).
