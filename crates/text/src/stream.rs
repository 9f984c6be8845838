//! Streaming detokenizer: turns ids into text as they are generated without
//! ever emitting a broken UTF-8 sequence.
//!
//! A character can span several byte-level tokens (CJK, emoji), so bytes are
//! held back until they form complete characters. Bytes that can never become
//! valid UTF-8 are emitted as U+FFFD (like `String::from_utf8_lossy`) instead of
//! stalling the stream; `finish` flushes an incomplete tail the same way.

use crate::tokenizer::Tokenizer;

/// Incremental id -> text decoder bound to a tokenizer.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        StreamDecoder { tok, pending: Vec::new() }
    }

    /// Adds one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend_from_slice(self.tok.token_bytes(id));
        self.drain(false)
    }

    /// Adds raw bytes (for callers that already hold token bytes).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.drain(false)
    }

    /// Flushes whatever is left; an incomplete trailing sequence becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    fn drain(&mut self, at_end: bool) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: `valid_up_to` bytes were just validated.
                    out.push_str(std::str::from_utf8(&self.pending[start..start + valid]).unwrap_or_default());
                    start += valid;
                    match e.error_len() {
                        // Definitely invalid bytes: replace them and go on.
                        Some(len) => {
                            out.push('\u{fffd}');
                            start += len;
                        }
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            if at_end {
                                out.push('\u{fffd}');
                                start = self.pending.len();
                            }
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
