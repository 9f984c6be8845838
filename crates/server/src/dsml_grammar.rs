//! Tracks, as generated text arrives, whether the model is writing DSML
//! *structure* (tags, parameter headers, JSON punctuation) or a *payload*
//! (content, a `string="true"` value, a JSON string inside a `string="false"`
//! value). Structure is sampled greedily so tool calls stay well-formed, while
//! payloads keep the request's sampling (ds4's rule, chat.md §7).

use dsv4_text::dsml::{TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN};

const PARAM_CLOSE: &str = "</｜DSML｜parameter>";
const STR_TRUE: &str = "string=\"true\">";
const STR_FALSE: &str = "string=\"false\">";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Outside,
    Structure,
    StrValue,
    JsonValue { in_string: bool, escaped: bool },
}

#[derive(Debug, Clone)]
pub struct DsmlGrammar {
    st: St,
    /// Recent text, for marker detection across token boundaries.
    tail: String,
}

impl Default for DsmlGrammar {
    fn default() -> Self {
        DsmlGrammar { st: St::Outside, tail: String::new() }
    }
}

impl DsmlGrammar {
    /// Whether the next token should be chosen greedily.
    pub fn structure(&self) -> bool {
        matches!(self.st, St::Structure | St::JsonValue { in_string: false, .. })
    }

    pub fn feed(&mut self, text: &str) {
        for ch in text.chars() {
            self.tail.push(ch);
            if self.tail.len() > 64 {
                let cut = self.tail.len() - 48;
                let cut = (cut..self.tail.len()).find(|&i| self.tail.is_char_boundary(i)).unwrap_or(self.tail.len());
                self.tail.drain(..cut);
            }
            self.st = match self.st {
                St::Outside if self.tail.ends_with(TOOL_CALLS_OPEN) => St::Structure,
                St::Structure if self.tail.ends_with(TOOL_CALLS_CLOSE) => St::Outside,
                St::Structure if self.tail.ends_with(STR_TRUE) => St::StrValue,
                St::Structure if self.tail.ends_with(STR_FALSE) => St::JsonValue { in_string: false, escaped: false },
                St::StrValue if self.tail.ends_with(PARAM_CLOSE) => St::Structure,
                St::JsonValue { .. } if self.tail.ends_with(PARAM_CLOSE) => St::Structure,
                St::JsonValue { in_string: true, escaped: true } => St::JsonValue { in_string: true, escaped: false },
                St::JsonValue { in_string: true, escaped: false } if ch == '\\' => St::JsonValue { in_string: true, escaped: true },
                St::JsonValue { in_string, escaped: false } if ch == '"' => St::JsonValue { in_string: !in_string, escaped: false },
                s => s,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_structure_and_payloads() {
        let mut g = DsmlGrammar::default();
        g.feed("Hello ");
        assert!(!g.structure());
        g.feed("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" ");
        assert!(g.structure());
        g.feed("string=\"true\">");
        assert!(!g.structure(), "string value is payload");
        g.feed("x y</｜DSML｜parameter>\n<｜DSML｜parameter name=\"b\" string=\"false\">");
        assert!(g.structure(), "JSON punctuation is structure");
        g.feed("{\"k\": \"v");
        assert!(!g.structure(), "JSON string is payload");
        g.feed("\\\"\"}");
        assert!(g.structure());
        g.feed("</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
        assert!(!g.structure());
    }
}
