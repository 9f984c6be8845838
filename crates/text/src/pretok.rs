//! DeepSeek V4's pre-tokenizer, hand-written for speed and exactness.
//!
//! The official `tokenizer.json` splits text with three successive Hugging Face
//! `Split` pre-tokenizers (behaviour "Isolated": matches and the gaps between
//! them both become pieces), evaluated by Oniguruma:
//!
//! 1. `\p{N}{1,3}`
//! 2. `[一-龥぀-ゟ゠-ヿ]+`
//! 3. `[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
//!
//! The `regex` crate cannot express the look-ahead and `fancy-regex` is slow, so
//! this module evaluates the same patterns directly over per-character classes.
//! Because number runs and CJK runs are isolated first and never merge with
//! their neighbours, one left-to-right pass can classify each character as
//! number / CJK / other and apply pattern 3 to each maximal "other" run. The
//! backtracking behaviour of each alternative of pattern 3 is reproduced in
//! [`match_at`] (see the comments there); the property test in
//! `tests/oracle.rs` checks the result against the `tokenizers` library.

use unicode_general_category::{get_general_category, GeneralCategory as G};

/// Character class as far as the three split patterns can tell characters apart.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Class {
    /// `[A-Za-z]` (a letter that pattern 3's first alternative also accepts).
    AsciiLetter,
    /// `\p{L}` other than ASCII letters.
    Letter,
    /// `\p{M}`
    Mark,
    /// Non-ASCII `\p{P}` or `\p{S}`.
    PunctSym,
    /// ASCII punctuation of pattern 3's first bracket (all are `\p{P}` or `\p{S}`).
    AsciiPunct,
    /// `\r` or `\n` (also whitespace).
    CrLf,
    /// U+0020 (also whitespace).
    Space,
    /// Other `\s` characters (Oniguruma's Unicode White_Space set).
    OtherWs,
    /// `\p{N}`: isolated by pattern 1.
    Number,
    /// The CJK / kana ranges of pattern 2.
    Cjk,
    /// Anything else (controls, format characters, private use, unassigned).
    Other,
}

impl Class {
    #[inline]
    fn is_lm(self) -> bool {
        matches!(self, Class::AsciiLetter | Class::Letter | Class::Mark)
    }
    #[inline]
    fn is_ps(self) -> bool {
        matches!(self, Class::PunctSym | Class::AsciiPunct)
    }
    #[inline]
    fn is_ws(self) -> bool {
        matches!(self, Class::CrLf | Class::Space | Class::OtherWs)
    }
}

/// Classes of the 128 ASCII characters (built at compile time).
const ASCII: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = if c.is_ascii_alphabetic() {
            Class::AsciiLetter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if c == b'\r' || c == b'\n' {
            Class::CrLf
        } else if c == b' ' {
            Class::Space
        } else if c == b'\t' || c == 0x0b || c == 0x0c {
            Class::OtherWs
        } else if c.is_ascii_punctuation() {
            Class::AsciiPunct
        } else {
            Class::Other
        };
        i += 1;
    }
    t
};

/// Oniguruma's `\s` for Unicode strings = the White_Space property.
#[inline]
fn is_unicode_ws(c: char) -> bool {
    matches!(c, '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

#[inline]
fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4e00}'..='\u{9fa5}' | '\u{3040}'..='\u{309f}' | '\u{30a0}'..='\u{30ff}')
}

/// Classifies one character.
#[inline]
pub(crate) fn classify(c: char) -> Class {
    let u = c as u32;
    if u < 128 {
        return ASCII[u as usize];
    }
    if is_cjk(c) {
        return Class::Cjk;
    }
    if is_unicode_ws(c) {
        return Class::OtherWs;
    }
    match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => Class::Letter,
        G::NonspacingMark | G::SpacingMark | G::EnclosingMark => Class::Mark,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Class::Number,
        G::ConnectorPunctuation
        | G::DashPunctuation
        | G::OpenPunctuation
        | G::ClosePunctuation
        | G::InitialPunctuation
        | G::FinalPunctuation
        | G::OtherPunctuation
        | G::MathSymbol
        | G::CurrencySymbol
        | G::ModifierSymbol
        | G::OtherSymbol => Class::PunctSym,
        _ => Class::Other,
    }
}

/// Reusable scratch space for [`split`], so the hot loop allocates nothing.
#[derive(Default)]
pub(crate) struct Scratch {
    /// (byte offset, class) of each character of the current "other" run.
    chars: Vec<(usize, Class)>,
}

/// Splits `text` into pre-token pieces, calling `emit` with each piece in order.
/// The pieces concatenate to `text`.
pub(crate) fn split<'a>(text: &'a str, scratch: &mut Scratch, mut emit: impl FnMut(&'a str)) {
    let bytes = text.as_bytes();
    let mut i = 0;
    // Start of the current run of characters that are neither numbers nor CJK.
    let mut other_start = 0;
    scratch.chars.clear();
    while i < bytes.len() {
        let (c, len) = next_char(text, i);
        let class = classify(c);
        match class {
            Class::Number | Class::Cjk => {
                split_other(text, other_start, &scratch.chars, &mut emit);
                scratch.chars.clear();
                // Collect the maximal run of this class.
                let start = i;
                let mut j = i + len;
                let mut count = 1usize;
                let mut chunk_start = start;
                while j < bytes.len() {
                    let (c2, l2) = next_char(text, j);
                    if classify(c2) != class {
                        break;
                    }
                    if class == Class::Number {
                        count += 1;
                        // `\p{N}{1,3}`: greedy groups of three from the left.
                        if count > 3 {
                            emit(&text[chunk_start..j]);
                            chunk_start = j;
                            count = 1;
                        }
                    }
                    j += l2;
                }
                emit(&text[chunk_start..j]);
                i = j;
                other_start = j;
            }
            _ => {
                scratch.chars.push((i, class));
                i += len;
            }
        }
    }
    split_other(text, other_start, &scratch.chars, &mut emit);
}

#[inline]
fn next_char(text: &str, i: usize) -> (char, usize) {
    let b = text.as_bytes()[i];
    if b < 0x80 {
        return (b as char, 1);
    }
    // `i` is always a char boundary (we only advance by char lengths).
    match text[i..].chars().next() {
        Some(c) => (c, c.len_utf8()),
        None => ('\u{fffd}', 1),
    }
}

/// Applies pattern 3 to one run of "other" characters (`chars` holds their offsets
/// and classes; the run ends where the next number/CJK run or the text ends).
fn split_other<'a>(text: &'a str, run_start: usize, chars: &[(usize, Class)], emit: &mut impl FnMut(&'a str)) {
    let n = chars.len();
    if n == 0 {
        return;
    }
    let run_end = chars[n - 1].0 + char_len_at(text, chars[n - 1].0);
    let off = |k: usize| if k < n { chars[k].0 } else { run_end };
    debug_assert_eq!(chars[0].0, run_start);
    let mut i = 0;
    let mut gap_start = 0;
    while i < n {
        match match_at(chars, i) {
            Some(end) => {
                if gap_start < i {
                    emit(&text[off(gap_start)..off(i)]);
                }
                emit(&text[off(i)..off(end)]);
                i = end;
                gap_start = end;
            }
            None => i += 1,
        }
    }
    if gap_start < n {
        emit(&text[off(gap_start)..run_end]);
    }
}

#[inline]
fn char_len_at(text: &str, i: usize) -> usize {
    next_char(text, i).1
}

/// End (exclusive, in characters) of the match of pattern 3 starting at char `i`,
/// or `None` when no alternative matches there (the character joins a gap).
#[inline]
fn match_at(chars: &[(usize, Class)], i: usize) -> Option<usize> {
    let n = chars.len();
    let class = |k: usize| chars[k].1;
    let run_end = |mut k: usize, pred: fn(Class) -> bool| {
        while k < n && pred(class(k)) {
            k += 1;
        }
        k
    };
    let c = class(i);
    let next = if i + 1 < n { Some(class(i + 1)) } else { None };
    // Alternative 1: one ASCII punctuation character, then [A-Za-z]+ (greedy).
    if c == Class::AsciiPunct && next == Some(Class::AsciiLetter) {
        return Some(run_end(i + 1, |x| x == Class::AsciiLetter));
    }
    // Alternative 2: [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ . A leading mark is taken
    // by the optional part or by the run itself with the same end, so any L/M
    // starts a maximal L/M run.
    if c.is_lm() {
        return Some(run_end(i, Class::is_lm));
    }
    if !matches!(c, Class::CrLf | Class::PunctSym | Class::AsciiPunct) && next.is_some_and(Class::is_lm) {
        return Some(run_end(i + 1, Class::is_lm));
    }
    // Alternative 3: ` ?[\p{P}\p{S}]+[\r\n]*`.
    if c.is_ps() || (c == Class::Space && next.is_some_and(Class::is_ps)) {
        let k = if c.is_ps() { i } else { i + 1 };
        let k = run_end(k, Class::is_ps);
        return Some(run_end(k, |x| x == Class::CrLf));
    }
    if c.is_ws() {
        let end = run_end(i, Class::is_ws);
        // Alternative 4: `\s*[\r\n]+` — \s* backtracks to the last CR/LF of the run.
        if let Some(last) = (i..end).rev().find(|&k| class(k) == Class::CrLf) {
            return Some(last + 1);
        }
        // Alternative 5: `\s+(?!\S)` — the whole run at the end of the piece, else
        // all but its last character (which is then followed by whitespace).
        if end == n {
            return Some(end);
        }
        if end - i >= 2 {
            return Some(end - 1);
        }
        // Alternative 6: `\s+` (a single whitespace character before a non-space).
        return Some(end);
    }
    None
}
