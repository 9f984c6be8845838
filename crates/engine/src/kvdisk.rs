//! Disk KV cache: checkpoints of sessions on disk, so a prompt that starts with
//! text seen before (another session, another run of the program) skips its
//! prefill. Modelled on ds4's (../shared/spec/chat.md §9), with a stricter file.
//!
//! A checkpoint is named by the lowercase hex SHA-1 of its rendered text (the
//! decoded text of its tokens) + `.kv`, and is found by the longest text that is
//! a byte prefix of a new prompt's rendering. File layout (little-endian):
//! ```text
//! 0  u8[4] magic "DKVC"         4  u32 version = 1
//! 8  u8 save reason (0 unknown, 1 cold, 2 continued, 3 evict, 4 shutdown)
//! 9  u8 RoPE precision of the state's compressed rows (0 f32, 1 bf16), u8[2] 0
//! 12 u32 token count            16 u64 fingerprint.arch
//! 24 u64 fingerprint.base       32 u64 fingerprint.full
//! 40 u64 creation unix time     48 u64 text length T
//! 56 u64 payload length P       64 u32 context size it was written for
//! 68 u32 crc32 of bytes 0..68 and the text
//! 72 u8[T] rendered text        72+T  session payload (state_io; its own CRC-32)
//! ```
//! The header is never rewritten: least-recently-used order is the file's
//! modification time, bumped on each hit. Crash safety: a file is written to
//! `NAME.kv.tmp.PID`, fsync'd, renamed over `NAME.kv` and the directory fsync'd,
//! so a reader sees either the old file, the new file or none; stale `.tmp`
//! files of dead writers are removed at open. A file that is truncated,
//! corrupt, of another version or of another model is skipped with a warning
//! (and removed when it is unreadable), never loaded. A checkpoint of another
//! state precision (`--kv-rope f32` vs `bf16`; files written before the option
//! existed have 0 there, f32) is valid for the other setting: it is skipped
//! with a warning and kept.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha1::{Digest, Sha1};

use crate::error::{EngineError, Result};
use crate::pack::RopeStore;
use crate::session::Session;
use crate::state_io::Fingerprint;

pub const FILE_MAGIC: [u8; 4] = *b"DKVC";
pub const FILE_VERSION: u32 = 1;
const HEADER_LEN: usize = 72;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveReason {
    Unknown = 0,
    Cold = 1,
    Continued = 2,
    Evict = 3,
    Shutdown = 4,
}

impl SaveReason {
    fn from_u8(v: u8) -> SaveReason {
        match v {
            1 => SaveReason::Cold,
            2 => SaveReason::Continued,
            3 => SaveReason::Evict,
            4 => SaveReason::Shutdown,
            _ => SaveReason::Unknown,
        }
    }
}

/// Knobs, with ds4's defaults.
#[derive(Clone, Debug)]
pub struct DiskCacheOptions {
    pub dir: PathBuf,
    /// Total bytes of `.kv` files kept; older (least recently used) files are evicted.
    pub budget_bytes: u64,
    /// Prompts shorter than this are not saved cold.
    pub min_tokens: usize,
    /// Prompts longer than this are not saved cold (they get continued saves).
    pub cold_max_tokens: usize,
    /// Tokens trimmed off a cold prompt's end (they change when the chat continues).
    pub trim_tokens: usize,
    /// Cold saves land on multiples of this.
    pub align_tokens: usize,
    /// Continued saves at multiples of this during long prefill / generation.
    pub continued_interval: usize,
    /// Accept checkpoints of the same model in another routed-expert quantisation.
    pub allow_other_quant: bool,
    /// The RoPE precision of the sessions this cache serves (`Backend::kv_rope`):
    /// `lookup` only offers checkpoints of it.
    pub kv_rope: RopeStore,
}

impl DiskCacheOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskCacheOptions {
            dir: dir.into(),
            budget_bytes: 8 << 30,
            min_tokens: 512,
            cold_max_tokens: 30000,
            trim_tokens: 32,
            align_tokens: 2048,
            continued_interval: 10240,
            allow_other_quant: false,
            kv_rope: RopeStore::F32,
        }
    }
}

/// A checkpoint found on disk (header and text verified; payload not yet read).
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: PathBuf,
    pub tokens: usize,
    pub text_len: usize,
    pub reason: SaveReason,
    pub file_bytes: u64,
    /// RoPE precision of the saved state.
    pub kv_rope: RopeStore,
}

struct Header {
    reason: SaveReason,
    kv_rope: RopeStore,
    tokens: u32,
    fp: Fingerprint,
    created: u64,
    text_len: u64,
    payload_len: u64,
    ctx: u32,
}

impl Header {
    fn encode(&self, text: &[u8]) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&FILE_MAGIC);
        h[4..8].copy_from_slice(&FILE_VERSION.to_le_bytes());
        h[8] = self.reason as u8;
        h[9] = rope_byte(self.kv_rope);
        h[12..16].copy_from_slice(&self.tokens.to_le_bytes());
        h[16..24].copy_from_slice(&self.fp.arch.to_le_bytes());
        h[24..32].copy_from_slice(&self.fp.base.to_le_bytes());
        h[32..40].copy_from_slice(&self.fp.full.to_le_bytes());
        h[40..48].copy_from_slice(&self.created.to_le_bytes());
        h[48..56].copy_from_slice(&self.text_len.to_le_bytes());
        h[56..64].copy_from_slice(&self.payload_len.to_le_bytes());
        h[64..68].copy_from_slice(&self.ctx.to_le_bytes());
        let crc = header_crc(&h, text);
        h[68..72].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks the header (not the text crc, which needs the text).
    fn decode(h: &[u8; HEADER_LEN]) -> std::result::Result<Header, String> {
        if h[0..4] != FILE_MAGIC {
            return Err("not a dsv4 KV checkpoint (bad magic)".into());
        }
        let u32at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let v = u32at(4);
        if v != FILE_VERSION {
            return Err(format!("version {v}, this engine reads {FILE_VERSION}"));
        }
        let kv_rope = match h[9] {
            0 => RopeStore::F32,
            1 => RopeStore::Bf16,
            b => return Err(format!("unknown RoPE precision {b}")),
        };
        Ok(Header {
            reason: SaveReason::from_u8(h[8]),
            kv_rope,
            tokens: u32at(12),
            fp: Fingerprint { arch: u64at(16), base: u64at(24), full: u64at(32) },
            created: u64at(40),
            text_len: u64at(48),
            payload_len: u64at(56),
            ctx: u32at(64),
        })
    }
}

fn rope_byte(r: RopeStore) -> u8 {
    match r {
        RopeStore::F32 => 0,
        RopeStore::Bf16 => 1,
    }
}

fn header_crc(h: &[u8; HEADER_LEN], text: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..68]);
    c.update(text);
    c.finalize()
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn text_key(text: &[u8]) -> String {
    let d = Sha1::digest(text);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct DiskCache {
    pub opts: DiskCacheOptions,
    fingerprint: Fingerprint,
    warn: Box<dyn Fn(&str) + Send + Sync>,
}

impl DiskCache {
    /// Opens (creating) the directory and removes temporary files of dead writers.
    pub fn open(opts: DiskCacheOptions, fingerprint: Fingerprint) -> Result<DiskCache> {
        fs::create_dir_all(&opts.dir)?;
        let c = DiskCache { opts, fingerprint, warn: Box::new(|m| eprintln!("warning: kv cache: {m}")) };
        for e in fs::read_dir(&c.opts.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.rsplit_once(".kv.tmp.").map(|(_, p)| p.to_string()) {
                if !pid_alive(&pid) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(c)
    }

    /// Where warnings go (default: stderr).
    pub fn set_warn(&mut self, f: Box<dyn Fn(&str) + Send + Sync>) {
        self.warn = f;
    }

    /// Position for a cold save of a prompt of `n` tokens, if any: trimmed and aligned down.
    pub fn cold_save_point(&self, n: usize) -> Option<usize> {
        let o = &self.opts;
        if n < o.min_tokens || n > o.cold_max_tokens {
            return None;
        }
        let a = o.align_tokens.max(1);
        let k = n.saturating_sub(o.trim_tokens) / a * a;
        (k > 0).then_some(k)
    }

    /// Continued-save frontiers crossed when going from `from` to `to` tokens (the last one).
    pub fn continued_point(&self, from: usize, to: usize) -> Option<usize> {
        let iv = self.opts.continued_interval;
        if iv == 0 {
            return None;
        }
        let k = to / iv * iv;
        (k > from && k > 0).then_some(k)
    }

    fn path_for(&self, text: &[u8]) -> PathBuf {
        self.opts.dir.join(format!("{}.kv", text_key(text)))
    }

    /// Saves `session` (whose tokens render to `text`) atomically; then evicts to budget.
    pub fn save(&self, session: &Session, text: &[u8], reason: SaveReason) -> Result<PathBuf> {
        let path = self.path_for(text);
        let tmp = path.with_extension(format!("kv.tmp.{}", std::process::id()));
        let res = (|| -> Result<()> {
            let f = File::create(&tmp)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            w.write_all(&[0u8; HEADER_LEN])?; // placeholder until the payload length is known
            w.write_all(text)?;
            session.save(&mut w)?;
            let mut f = w.into_inner().map_err(|e| EngineError::Io(e.into_error()))?;
            let end = f.stream_position()?;
            let h = Header {
                reason,
                kv_rope: session.backend().kv_rope(),
                tokens: session.pos() as u32,
                fp: session.backend().fingerprint(),
                created: now_unix(),
                text_len: text.len() as u64,
                payload_len: end - HEADER_LEN as u64 - text.len() as u64,
                ctx: session.ctx().min(u32::MAX as usize) as u32,
            };
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&h.encode(text))?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            if let Ok(d) = File::open(&self.opts.dir) {
                let _ = d.sync_all(); // make the rename durable (best effort; not all filesystems allow it)
            }
            Ok(())
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.evict_to_budget(Some(&path));
        Ok(path)
    }

    /// Reads and verifies a file's header and text. `Err` = unusable file (with why).
    fn read_head(&self, path: &Path) -> std::result::Result<(Header, Vec<u8>, u64), String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        let mut h = [0u8; HEADER_LEN];
        f.read_exact(&mut h).map_err(|_| "truncated header".to_string())?;
        let hd = Header::decode(&h)?;
        if (HEADER_LEN as u64).checked_add(hd.text_len).and_then(|v| v.checked_add(hd.payload_len)) != Some(size) {
            return Err(format!("size {size} does not match its header (truncated or corrupt)"));
        }
        let mut text = vec![0u8; hd.text_len as usize];
        f.read_exact(&mut text).map_err(|_| "truncated text".to_string())?;
        let crc = u32::from_le_bytes([h[68], h[69], h[70], h[71]]);
        if header_crc(&h, &text) != crc {
            return Err("header checksum mismatch (corrupt)".into());
        }
        Ok((hd, text, size))
    }

    /// All readable entries of this model: (entry, text, modification time).
    fn scan(&self) -> Vec<(Entry, Vec<u8>)> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.opts.dir) else { return out };
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("kv") {
                continue;
            }
            match self.read_head(&path) {
                Ok((h, text, size)) => {
                    if !self.fingerprint.accepts(&h.fp, self.opts.allow_other_quant) {
                        continue; // another model's checkpoint: not ours to judge or delete
                    }
                    let entry = Entry { path, tokens: h.tokens as usize, text_len: text.len(), reason: h.reason, file_bytes: size, kv_rope: h.kv_rope };
                    out.push((entry, text));
                }
                Err(why) => {
                    (self.warn)(&format!("skipping {}: {why}; removing it", path.display()));
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// The checkpoint whose text is the longest byte prefix of `rendered`, among
    /// those of this cache's RoPE precision (`opts.kv_rope`). A longer match of
    /// the other precision is reported with a warning and left alone.
    pub fn lookup(&self, rendered: &[u8]) -> Option<Entry> {
        let hits: Vec<Entry> = self.scan().into_iter().filter(|(e, text)| e.tokens > 0 && rendered.starts_with(text)).map(|(e, _)| e).collect();
        let best = hits.iter().filter(|e| e.kv_rope == self.opts.kv_rope).max_by_key(|e| e.text_len).cloned();
        if let Some(o) = hits.iter().filter(|e| e.kv_rope != self.opts.kv_rope).max_by_key(|e| e.text_len) {
            if best.as_ref().is_none_or(|b| o.text_len > b.text_len) {
                (self.warn)(&format!(
                    "not using {} ({} tokens): saved with --kv-rope {}, this session uses --kv-rope {}",
                    o.path.display(),
                    o.tokens,
                    o.kv_rope,
                    self.opts.kv_rope
                ));
            }
        }
        best
    }

    /// Loads an entry into `session`; on any problem the file is reported and
    /// removed, the session is left as it was, and `Ok(false)` is returned.
    pub fn load_into(&self, entry: &Entry, session: &mut Session) -> Result<bool> {
        let want = session.backend().kv_rope();
        if entry.kv_rope != want {
            // a valid checkpoint for the other setting: skip it, keep the file
            (self.warn)(&format!("skipping {}: saved with --kv-rope {}, this session uses --kv-rope {want}", entry.path.display(), entry.kv_rope));
            return Ok(false);
        }
        let res = (|| -> std::result::Result<(), String> {
            let (_, _, _) = self.read_head(&entry.path)?;
            let mut f = BufReader::with_capacity(1 << 20, File::open(&entry.path).map_err(|e| e.to_string())?);
            f.seek(SeekFrom::Start(HEADER_LEN as u64 + entry.text_len as u64)).map_err(|e| e.to_string())?;
            session.load(&mut f).map_err(|e| e.to_string())
        })();
        match res {
            Ok(()) => {
                // a hit makes the file most recently used
                if let Ok(f) = OpenOptions::new().write(true).open(&entry.path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Ok(true)
            }
            Err(why) => {
                (self.warn)(&format!("skipping {}: {why}; removing it", entry.path.display()));
                let _ = fs::remove_file(&entry.path);
                Ok(false)
            }
        }
    }

    /// Removes least recently used files until the total fits the budget (never `keep`).
    pub fn evict_to_budget(&self, keep: Option<&Path>) {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let Ok(rd) = fs::read_dir(&self.opts.dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("kv") {
                continue;
            }
            if let Ok(m) = e.metadata() {
                files.push((m.modified().unwrap_or(UNIX_EPOCH), m.len(), p));
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, p) in files {
            if total <= self.opts.budget_bytes {
                break;
            }
            if Some(p.as_path()) == keep {
                continue;
            }
            if fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
    }
}

/// Whether a process id (from a temp file name) still runs; unknown = alive
/// only when it is our own id (other platforms: treat every temp file as stale).
fn pid_alive(pid: &str) -> bool {
    let Ok(p) = pid.parse::<u32>() else { return false };
    if p == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{p}")).exists()
    } else {
        false
    }
}
