//! placeholder; see issues
