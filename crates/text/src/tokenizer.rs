//! Byte-level BPE tokenizer with DeepSeek V4's pre-tokenizer and added tokens.
//!
//! Encoding follows Hugging Face `tokenizers` for the official `tokenizer.json`:
//! added tokens are cut out of the text first (leftmost-longest, atomically),
//! the remaining spans are pre-tokenized ([`crate::pretok`]), each piece's
//! bytes become GPT-2 byte-alphabet symbols, and BPE repeatedly merges the
//! adjacent pair of lowest merge rank (leftmost on ties). The core constructor
//! takes plain data so the tokenizer can be built from GGUF metadata
//! (`gguf_glue`) or from a `tokenizer.json` (`hf_json`) alike.

use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use aho_corasick::{AhoCorasick, MatchKind};

use crate::error::TokenizerError;
use crate::pretok;

/// GGUF token types (llama.cpp numbering) that matter here.
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    /// Special tokens such as BOS/EOS; matched atomically in text.
    pub const CONTROL: i32 = 3;
    /// Added tokens that are not "special"; also matched atomically.
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The GPT-2 byte alphabet: byte -> char. Printable bytes map to themselves,
/// the other 68 bytes to U+0100.. in increasing byte order.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let cp = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        // All code points here are < 0x200, so always valid chars.
        table[b as usize] = char::from_u32(cp).unwrap_or('\0');
    }
    table
}

/// A small, fast hasher for integer-pair keys (FxHash). The merge table is hit
/// once per candidate pair, so SipHash would dominate the profile.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64)
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// One pass of atomic (added-token) matching.
#[derive(Clone)]
struct AtomicPass {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

/// A piece of input after added-token splitting.
enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Pieces longer than this are not cached (rare, and would bloat the cache).
const CACHE_MAX_PIECE: usize = 32;
/// The cache is reset when it grows past this many entries.
const CACHE_MAX_ENTRIES: usize = 1 << 18;

/// Per-call scratch state of `encode`.
#[derive(Default)]
struct EncodeCtx<'a> {
    scratch: pretok::Scratch,
    syms: Vec<u32>,
    cache: FxMap<&'a [u8], (u32, u32)>,
    cached_ids: Vec<u32>,
}

/// DeepSeek V4 tokenizer. Cheap to share (`&self` everywhere; `Send + Sync`).
#[derive(Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i32>,
    bytes: Vec<Vec<u8>>,
    vocab: HashMap<String, u32>,
    /// Token id of each single byte (byte-alphabet character).
    byte_ids: [u32; 256],
    /// (left, right) -> (rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    passes: Vec<AtomicPass>,
    bos: u32,
    eos: u32,
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds a tokenizer from GGUF-style data: token strings in id order (byte
    /// alphabet for normal tokens, literal text for added ones), merges as
    /// `"left right"` in rank order, llama.cpp token types (3 = control and
    /// 4 = user-defined are matched atomically in text), and the BOS/EOS ids.
    /// An empty `token_types` means "all normal".
    pub fn new(tokens: Vec<String>, merges: Vec<String>, token_types: Vec<i32>, bos: u32, eos: u32) -> Result<Self, TokenizerError> {
        let types = if token_types.is_empty() { vec![token_type::NORMAL; tokens.len()] } else { token_types };
        if types.len() != tokens.len() {
            return Err(TokenizerError::TypeCountMismatch { tokens: tokens.len(), types: types.len() });
        }
        for id in [bos, eos] {
            if id as usize >= tokens.len() {
                return Err(TokenizerError::IdOutOfRange { id, vocab: tokens.len() });
            }
        }
        let atomic: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| is_atomic_type(types[i as usize]) && !tokens[i as usize].is_empty())
            .collect();
        let mut tok = Self::build(tokens, types, &merges, bos, eos)?;
        tok.passes = Self::make_passes(&tok.tokens, &[atomic])?;
        Ok(tok)
    }

    fn build(tokens: Vec<String>, types: Vec<i32>, merges: &[String], bos: u32, eos: u32) -> Result<Self, TokenizerError> {
        let mut vocab = HashMap::with_capacity(tokens.len());
        // For duplicate strings the first id wins for normal lookups, but an
        // atomic token must win over a normal token of the same text.
        for (i, t) in tokens.iter().enumerate() {
            let atomic = is_atomic_type(types[i]);
            match vocab.get(t) {
                Some(&prev) if !(atomic && !is_atomic_type(types[prev as usize])) => {}
                _ => {
                    vocab.insert(t.clone(), i as u32);
                }
            }
        }
        let b2c = byte_to_char_table();
        let mut c2b: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, &c) in b2c.iter().enumerate() {
            c2b.insert(c, b as u8);
        }
        let mut byte_ids = [0u32; 256];
        for (b, &c) in b2c.iter().enumerate() {
            match vocab.get(c.encode_utf8(&mut [0u8; 4]) as &str) {
                Some(&id) => byte_ids[b] = id,
                None => return Err(TokenizerError::MissingByte(b as u8)),
            }
        }
        let bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| {
                if is_atomic_type(ty) {
                    return t.as_bytes().to_vec();
                }
                // Hugging Face's ByteLevel decoder: map every char back to its
                // byte, or keep the token's UTF-8 if any char is outside the alphabet.
                let mapped: Option<Vec<u8>> = t.chars().map(|c| c2b.get(&c).copied()).collect();
                mapped.unwrap_or_else(|| t.as_bytes().to_vec())
            })
            .collect();
        let mut merge_map: FxMap<u64, (u32, u32)> = FxMap::default();
        merge_map.reserve(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let bad = || TokenizerError::BadMerge { index: rank, merge: m.clone() };
            let (l, r) = m.split_once(' ').ok_or_else(bad)?;
            let li = *vocab.get(l).ok_or_else(bad)?;
            let ri = *vocab.get(r).ok_or_else(bad)?;
            let mut joined = String::with_capacity(l.len() + r.len());
            joined.push_str(l);
            joined.push_str(r);
            let merged = *vocab.get(&joined).ok_or_else(bad)?;
            // A repeated pair takes its last rank, as `tokenizers` (it collects
            // the merges into a map). The official file has no repeats.
            merge_map.insert(pair_key(li, ri), (rank as u32, merged));
        }
        Ok(Tokenizer { tokens, types, bytes, vocab, byte_ids, merges: merge_map, passes: Vec::new(), bos, eos })
    }

    /// Builds the atomic matchers, one per group of token ids, applied in order.
    fn make_passes(tokens: &[String], groups: &[Vec<u32>]) -> Result<Vec<AtomicPass>, TokenizerError> {
        let mut passes = Vec::new();
        for ids in groups {
            if ids.is_empty() {
                continue;
            }
            let pats: Vec<&str> = ids.iter().map(|&i| tokens[i as usize].as_str()).collect();
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&pats)
                .map_err(|e| TokenizerError::Matcher(e.to_string()))?;
            passes.push(AtomicPass { matcher, ids: ids.clone() });
        }
        Ok(passes)
    }

    /// Replaces the atomic matching passes (used by the `tokenizer.json` loader,
    /// which, like `tokenizers`, first splits on non-normalized added tokens and
    /// then on normalized ones).
    pub(crate) fn set_atomic_groups(&mut self, groups: &[Vec<u32>]) -> Result<(), TokenizerError> {
        self.passes = Self::make_passes(&self.tokens, groups)?;
        Ok(())
    }

    /// Encodes text; added/special tokens occurring in the text are recognised
    /// atomically (as the chat encoding needs). No BOS is added.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        let mut segs = vec![Segment::Text(text)];
        for pass in &self.passes {
            let mut next = Vec::with_capacity(segs.len());
            for seg in segs {
                match seg {
                    Segment::Token(id) => next.push(Segment::Token(id)),
                    Segment::Text(t) => {
                        let mut last = 0;
                        for m in pass.matcher.find_iter(t) {
                            if m.start() > last {
                                next.push(Segment::Text(&t[last..m.start()]));
                            }
                            next.push(Segment::Token(pass.ids[m.pattern().as_usize()]));
                            last = m.end();
                        }
                        if last < t.len() {
                            next.push(Segment::Text(&t[last..]));
                        }
                    }
                }
            }
            segs = next;
        }
        let mut ctx = EncodeCtx::default();
        for seg in segs {
            match seg {
                Segment::Token(id) => out.push(id),
                Segment::Text(t) => self.encode_span(t, &mut ctx, &mut out),
            }
        }
        out
    }

    /// Encodes text as plain text: added-token strings are tokenized by BPE like
    /// any other text (use for untrusted content that must not inject control tokens).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        let mut ctx = EncodeCtx::default();
        self.encode_span(text, &mut ctx, &mut out);
        out
    }

    fn encode_span<'a>(&self, text: &'a str, ctx: &mut EncodeCtx<'a>, out: &mut Vec<u32>) {
        let EncodeCtx { scratch, syms, cache, cached_ids } = ctx;
        pretok::split(text, scratch, |piece| {
            let piece = piece.as_bytes();
            if piece.len() == 1 {
                out.push(self.byte_ids[piece[0] as usize]);
                return;
            }
            // Natural text repeats its words, so a per-call cache of short
            // pieces skips most BPE work.
            if piece.len() > CACHE_MAX_PIECE {
                self.bpe(piece, syms, out);
                return;
            }
            if let Some(&(start, len)) = cache.get(piece) {
                out.extend_from_slice(&cached_ids[start as usize..(start + len) as usize]);
                return;
            }
            let before = out.len();
            self.bpe(piece, syms, out);
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
                cached_ids.clear();
            }
            let start = cached_ids.len() as u32;
            cached_ids.extend_from_slice(&out[before..]);
            cache.insert(piece, (start, (out.len() - before) as u32));
        });
    }

    /// BPE over one pre-token piece; appends the ids to `out`.
    fn bpe(&self, piece: &[u8], syms: &mut Vec<u32>, out: &mut Vec<u32>) {
        syms.clear();
        syms.extend(piece.iter().map(|&b| self.byte_ids[b as usize]));
        if syms.len() > 48 {
            self.bpe_heap(syms);
        } else {
            // Short pieces (nearly all of them): keep the rank of every adjacent
            // pair and rescan that small array for the minimum; only the two
            // pairs touching a merge are looked up again.
            let mut ranks = [u32::MAX; 48];
            let mut news = [0u32; 48];
            let mut np = syms.len().saturating_sub(1);
            let lookup = |a: u32, b: u32| self.merges.get(&pair_key(a, b)).copied().unwrap_or((u32::MAX, 0));
            for k in 0..np {
                (ranks[k], news[k]) = lookup(syms[k], syms[k + 1]);
            }
            loop {
                let mut best = u32::MAX;
                let mut bk = 0;
                for (k, &r) in ranks[..np].iter().enumerate() {
                    if r < best {
                        best = r;
                        bk = k;
                    }
                }
                if best == u32::MAX {
                    break;
                }
                syms[bk] = news[bk];
                syms.remove(bk + 1);
                ranks.copy_within(bk + 1..np, bk);
                news.copy_within(bk + 1..np, bk);
                np -= 1;
                if bk > 0 {
                    (ranks[bk - 1], news[bk - 1]) = lookup(syms[bk - 1], syms[bk]);
                }
                if bk < np {
                    (ranks[bk], news[bk]) = lookup(syms[bk], syms[bk + 1]);
                }
            }
        }
        out.extend_from_slice(syms);
    }

    /// Heap-driven BPE for long pieces: same result as the scan (lowest rank,
    /// then leftmost), in O(n log n).
    fn bpe_heap(&self, syms: &mut Vec<u32>) {
        let n = syms.len();
        const NONE: usize = usize::MAX;
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize)>>, syms: &[u32], i: usize, j: usize| {
            if let Some(&(rank, _)) = self.merges.get(&pair_key(syms[i], syms[j])) {
                heap.push(std::cmp::Reverse((rank, i)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, syms, i, i + 1);
        }
        while let Some(std::cmp::Reverse((rank, i))) = heap.pop() {
            if !alive[i] || next[i] == NONE {
                continue;
            }
            let j = next[i];
            // Stale entry: the pair at i changed since it was pushed.
            match self.merges.get(&pair_key(syms[i], syms[j])) {
                Some(&(r, merged)) if r == rank => {
                    syms[i] = merged;
                    alive[j] = false;
                    next[i] = next[j];
                    if next[j] != NONE {
                        prev[next[j]] = i;
                    }
                    if prev[i] != NONE {
                        push(&mut heap, syms, prev[i], i);
                    }
                    if next[i] != NONE {
                        push(&mut heap, syms, i, next[i]);
                    }
                }
                _ => continue,
            }
        }
        let mut k = 0;
        for i in 0..n {
            if alive[i] {
                syms[k] = syms[i];
                k += 1;
            }
        }
        syms.truncate(k);
    }

    /// Concatenated bytes of the tokens (unknown ids are skipped). Added tokens
    /// decode to their literal text.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    /// Bytes of one token (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }

    /// The token's string as stored in the vocabulary (byte alphabet for normal tokens).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }

    /// The token type (llama.cpp numbering) of an id.
    pub fn token_type(&self, id: u32) -> Option<i32> {
        self.types.get(id as usize).copied()
    }

    /// Id of a vocabulary string (byte-alphabet form, or literal for added tokens).
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.vocab.get(s).copied()
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// All token strings in id order.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// All token types in id order.
    pub fn token_types(&self) -> &[i32] {
        &self.types
    }

    /// The merges as `"left right"` strings in rank order.
    pub fn merges(&self) -> Vec<String> {
        let mut v: Vec<(u32, u64)> = self.merges.iter().map(|(&k, &(r, _))| (r, k)).collect();
        v.sort_unstable();
        v.into_iter()
            .map(|(_, k)| format!("{} {}", self.tokens[(k >> 32) as usize], self.tokens[(k & 0xffff_ffff) as usize]))
            .collect()
    }

    /// Whether an id is an added/special token (matched atomically, decoded literally).
    pub fn is_special(&self, id: u32) -> bool {
        self.types.get(id as usize).is_some_and(|&t| is_atomic_type(t))
    }
}

fn is_atomic_type(t: i32) -> bool {
    t == token_type::CONTROL || t == token_type::USER_DEFINED
}
