//! `dsv4 download`: fetch a published GGUF from the Hugging Face Hub, safely.
//!
//! * Files are resolved through the hub's HTTP API
//!   (`GET /api/models/{repo}/revision/{rev}?blobs=true`, whose `siblings` give
//!   each file's size and, for LFS files, its SHA-256), and fetched from
//!   `/{repo}/resolve/{rev}/{file}`.
//! * Downloads go to `NAME.part` and resume with an HTTP `Range` request after
//!   an interruption (in this run, after a retry, or in a later run). The
//!   finished file must have the published size and SHA-256; only then is it
//!   renamed to `NAME`. A mismatch deletes the partial file and fails.
//! * Redirects are followed by hand (at most 10) so the token is sent only to
//!   the hub's own origin, never to the CDN a redirect points at.
//! * 429 / 5xx / dropped connections are retried with backoff (honouring a
//!   short `Retry-After`); 401 / 403 / 404 fail at once with a clear message.
//! * The token (from `--token`, `HF_TOKEN`, or the local Hugging Face token
//!   file) must be visible ASCII without spaces; it only ever goes into the
//!   `Authorization` header and is redacted from `Debug`. No shell is involved.
//! * Every name that comes from the server is validated: relative, no `..`,
//!   no backslashes or control characters; nothing is written outside `--dir`.
//! * `./dsv4flash.gguf` (or `--link`) is pointed at the result with a symlink
//!   created beside it and renamed over it (atomic replacement).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
pub const DEFAULT_REPO: &str = "antirez/deepseek-v4-gguf";

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{url}: authentication failed (HTTP {status}); pass --token, set HF_TOKEN, or log in with the Hugging Face CLI")]
    Auth { url: String, status: u16 },
    #[error("{url}: not found (HTTP 404)")]
    NotFound { url: String },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: {msg}")]
    Transport { url: String, msg: String },
    #[error("the hub's file list is malformed: {0}")]
    Listing(String),
    #[error("refusing unsafe file name from the server: {0:?}")]
    UnsafeName(String),
    #[error("no file in {repo} matches {what}; available: {available}")]
    NoMatch { repo: String, what: String, available: String },
    #[error("{file}: size {got} differs from the published {want}")]
    Size { file: String, got: u64, want: u64 },
    #[error("{file}: SHA-256 {got} differs from the published {want}")]
    Checksum { file: String, got: String, want: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("gave up after {tries} attempts: {last}")]
    Retries { tries: u32, last: String },
}

type Result<T> = std::result::Result<T, DownloadError>;

/// An access token. Never printed: `Debug` is redacted and it has no `Display`.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Accepts only visible ASCII without spaces (what hub tokens are), which
    /// rules out header injection (CR/LF) and anything shell-like being
    /// mistaken for a token. The error never repeats the token.
    pub fn new(s: &str) -> Result<Token> {
        let s = s.trim_end_matches(['\n', '\r']);
        if s.is_empty() || s.len() > 1024 || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(DownloadError::Invalid("the access token contains characters that are not allowed (only visible ASCII, no spaces or newlines)".into()));
        }
        Ok(Token(s.to_string()))
    }

    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// `--token`, else `HF_TOKEN`, else `$HF_TOKEN_PATH`, `$HF_HOME/token` or
/// `~/.cache/huggingface/token`.
pub fn resolve_token(cli: Option<&str>) -> Result<Option<Token>> {
    if let Some(t) = cli {
        return Token::new(t).map(Some);
    }
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.is_empty() {
            return Token::new(&t).map(Some);
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        std::env::var_os("HF_HOME")
            .map(|h| PathBuf::from(h).join("token"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token")))
    });
    match path.and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(t) if !t.trim().is_empty() => Token::new(t.trim()).map(Some),
        _ => Ok(None),
    }
}

/// What to download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Q2,
    Q4,
    Q2Imatrix,
    Q4Imatrix,
    Mtp,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        Some(match s {
            "q2" => Target::Q2,
            "q4" => Target::Q4,
            "q2-imatrix" => Target::Q2Imatrix,
            "q4-imatrix" => Target::Q4Imatrix,
            "mtp" => Target::Mtp,
            _ => return None,
        })
    }

    /// Whether a hub file name belongs to this target (the ds4 file families,
    /// gguf.md §3.4: `IQ2XXS-w2Q2K-...`, `Q4KExperts-...`, `-imatrix`, MTP).
    pub fn matches(self, name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        if !n.ends_with(".gguf") {
            return false;
        }
        let mtp = n.contains("mtp");
        let imat = n.contains("imatrix");
        let q2 = n.contains("iq2xxs") || n.contains("q2k");
        let q4 = n.contains("q4kexperts") || n.contains("q4_k") || n.contains("q4k");
        match self {
            Target::Mtp => mtp,
            Target::Q2 => q2 && !imat && !mtp,
            Target::Q2Imatrix => q2 && imat && !mtp,
            Target::Q4 => q4 && !q2 && !imat && !mtp,
            Target::Q4Imatrix => q4 && !q2 && imat && !mtp,
        }
    }

    pub fn default_link(self) -> &'static str {
        if self == Target::Mtp {
            "dsv4flash-mtp.gguf"
        } else {
            "dsv4flash.gguf"
        }
    }
}

#[derive(Clone, Debug)]
pub struct DownloadOptions {
    pub target: Target,
    pub repo: String,
    pub revision: String,
    pub dir: PathBuf,
    pub token: Option<Token>,
    pub endpoint: String,
    /// Exact file to fetch instead of matching by target.
    pub file: Option<String>,
    /// Symlink to point at the result (`None`: no link).
    pub link: Option<PathBuf>,
    pub max_retries: u32,
    /// Longest wait between retries.
    pub max_backoff: Duration,
}

/// Byte progress (the CLI shows a bar).
pub trait DownloadProgress {
    fn file(&self, _name: &str, _size: u64, _already: u64) {}
    fn bytes(&self, _n: u64) {}
    fn done(&self) {}
}

pub struct Quiet;
impl DownloadProgress for Quiet {}

/// One file of the listing.
#[derive(Clone, Debug)]
pub struct RemoteFile {
    pub name: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

/// A repo id is `owner/name` of `[A-Za-z0-9._-]`, no `..`.
pub fn validate_repo(repo: &str) -> Result<()> {
    let ok_part = |p: &str| !p.is_empty() && p != "." && p != ".." && !p.contains("..") && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    match repo.split_once('/') {
        Some((a, b)) if ok_part(a) && ok_part(b) => Ok(()),
        _ => Err(DownloadError::Invalid(format!("repository {repo:?} is not of the form owner/name"))),
    }
}

/// A server-supplied path: relative, `/`-separated, components of safe characters.
pub fn validate_remote_name(name: &str) -> Result<()> {
    let bad = || DownloadError::UnsafeName(name.to_string());
    if name.is_empty() || name.len() > 512 || name.starts_with('/') || name.contains('\\') || name.contains(':') {
        return Err(bad());
    }
    for c in name.split('/') {
        if c.is_empty() || c == "." || c == ".." || c.starts_with('.') || c.chars().any(|ch| ch.is_control()) {
            return Err(bad());
        }
    }
    Ok(())
}

fn percent_encode_path(name: &str) -> String {
    let mut s = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn origin(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find('/').unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + end])
}

fn join_location(base: &str, loc: &str) -> Option<String> {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        Some(loc.to_string())
    } else if loc.starts_with('/') {
        Some(format!("{}{loc}", origin(base)?))
    } else {
        None
    }
}

struct Client {
    agent: ureq::Agent,
    endpoint_origin: String,
    token: Option<Token>,
}

enum Outcome {
    Ok(Box<ureq::Response>),
    Retry(String, Option<Duration>),
}

impl Client {
    fn new(endpoint: &str, token: Option<Token>) -> Result<Client> {
        let endpoint_origin = origin(endpoint).ok_or_else(|| DownloadError::Invalid(format!("endpoint {endpoint:?} is not an http(s) URL")))?.to_string();
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("dsv4/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client { agent, endpoint_origin, token })
    }

    /// One GET with manual redirects; the token goes only to the endpoint's origin.
    fn get(&self, url: &str, range_from: u64) -> Result<Outcome> {
        let mut url = url.to_string();
        for _ in 0..10 {
            let mut req = self.agent.get(&url);
            if range_from > 0 {
                req = req.set("Range", &format!("bytes={range_from}-"));
            }
            if let Some(t) = &self.token {
                if origin(&url) == Some(self.endpoint_origin.as_str()) {
                    req = req.set("Authorization", &t.header());
                }
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(t)) => return Ok(Outcome::Retry(format!("{url}: {}", t.kind()), None)),
            };
            let status = resp.status();
            match status {
                200..=299 | 416 => return Ok(Outcome::Ok(Box::new(resp))),
                301 | 302 | 303 | 307 | 308 => {
                    let loc = resp.header("location").ok_or_else(|| DownloadError::Http { url: url.clone(), status })?;
                    url = join_location(&url, loc).ok_or_else(|| DownloadError::Transport { url: url.clone(), msg: "unusable redirect location".into() })?;
                }
                401 | 403 => return Err(DownloadError::Auth { url, status }),
                404 => return Err(DownloadError::NotFound { url }),
                429 | 500..=599 => {
                    let wait = resp.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
                    return Ok(Outcome::Retry(format!("{url}: HTTP {status}"), wait));
                }
                _ => return Err(DownloadError::Http { url, status }),
            }
        }
        Err(DownloadError::Transport { url, msg: "too many redirects".into() })
    }
}

fn backoff(attempt: u32, hint: Option<Duration>, max: Duration) -> Duration {
    hint.unwrap_or_else(|| Duration::from_millis(500u64.saturating_mul(1 << attempt.min(6)))).min(max)
}

/// Lists the repository's files with sizes and LFS SHA-256s.
pub fn list_files(opts: &DownloadOptions) -> Result<Vec<RemoteFile>> {
    validate_repo(&opts.repo)?;
    let client = Client::new(&opts.endpoint, opts.token.clone())?;
    let url = format!("{}/api/models/{}/revision/{}?blobs=true", opts.endpoint.trim_end_matches('/'), opts.repo, percent_encode_path(&opts.revision));
    let mut last = String::new();
    for attempt in 0..=opts.max_retries {
        match client.get(&url, 0)? {
            Outcome::Ok(resp) => {
                if resp.status() != 200 {
                    return Err(DownloadError::Http { url, status: resp.status() });
                }
                let mut body = Vec::new();
                resp.into_reader().take(64 << 20).read_to_end(&mut body).map_err(|e| DownloadError::Transport { url: url.clone(), msg: e.to_string() })?;
                return parse_listing(&body);
            }
            Outcome::Retry(msg, hint) => {
                last = msg;
                if attempt < opts.max_retries {
                    std::thread::sleep(backoff(attempt, hint, opts.max_backoff));
                }
            }
        }
    }
    Err(DownloadError::Retries { tries: opts.max_retries + 1, last })
}

fn parse_listing(body: &[u8]) -> Result<Vec<RemoteFile>> {
    let j: Json = serde_json::from_slice(body).map_err(|e| DownloadError::Listing(e.to_string()))?;
    let sib = j.get("siblings").and_then(Json::as_array).ok_or_else(|| DownloadError::Listing("no siblings array".into()))?;
    let mut out = Vec::new();
    for s in sib {
        let name = s.get("rfilename").and_then(Json::as_str).ok_or_else(|| DownloadError::Listing("sibling without rfilename".into()))?;
        let lfs = s.get("lfs");
        let size = lfs.and_then(|l| l.get("size")).and_then(Json::as_u64).or_else(|| s.get("size").and_then(Json::as_u64));
        let sha256 = lfs.and_then(|l| l.get("sha256")).and_then(Json::as_str).map(str::to_ascii_lowercase);
        if let Some(h) = &sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DownloadError::Listing(format!("{name:?}: malformed sha256")));
            }
        }
        out.push(RemoteFile { name: name.to_string(), size, sha256 });
    }
    Ok(out)
}

/// Picks the files for the target (all parts of a split GGUF), validating names.
pub fn select(files: &[RemoteFile], opts: &DownloadOptions) -> Result<Vec<RemoteFile>> {
    let chosen: Vec<RemoteFile> = match &opts.file {
        Some(f) => files.iter().filter(|x| &x.name == f).cloned().collect(),
        None => files.iter().filter(|x| opts.target.matches(&x.name)).cloned().collect(),
    };
    for f in &chosen {
        validate_remote_name(&f.name)?;
    }
    if chosen.is_empty() {
        let avail: Vec<&str> = files.iter().map(|f| f.name.as_str()).filter(|n| n.ends_with(".gguf")).collect();
        return Err(DownloadError::NoMatch {
            repo: opts.repo.clone(),
            what: opts.file.clone().unwrap_or_else(|| format!("{:?}", opts.target)),
            available: if avail.is_empty() { "no .gguf files".into() } else { avail.join(", ") },
        });
    }
    if chosen.len() > 1 && !chosen.iter().all(|f| f.name.contains("-of-")) {
        let names: Vec<&str> = chosen.iter().map(|f| f.name.as_str()).collect();
        return Err(DownloadError::Invalid(format!("several files match ({}); choose one with --file", names.join(", "))));
    }
    let mut chosen = chosen;
    chosen.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(chosen)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io { path: path.to_path_buf(), source }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn verify(path: &Path, f: &RemoteFile) -> Result<()> {
    let got = std::fs::metadata(path).map_err(io_err(path))?.len();
    if let Some(want) = f.size {
        if got != want {
            return Err(DownloadError::Size { file: f.name.clone(), got, want });
        }
    }
    if let Some(want) = &f.sha256 {
        let got = sha256_file(path)?;
        if &got != want {
            return Err(DownloadError::Checksum { file: f.name.clone(), got, want: want.clone() });
        }
    }
    Ok(())
}

/// Downloads one file to `dir/name` (resuming `dir/name.part`), verified.
pub fn fetch_file(opts: &DownloadOptions, f: &RemoteFile, progress: &dyn DownloadProgress) -> Result<PathBuf> {
    validate_remote_name(&f.name)?;
    let dest = opts.dir.join(&f.name);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if dest.exists() && verify(&dest, f).is_ok() {
        return Ok(dest);
    }
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let client = Client::new(&opts.endpoint, opts.token.clone())?;
    let url = format!("{}/{}/resolve/{}/{}", opts.endpoint.trim_end_matches('/'), opts.repo, percent_encode_path(&opts.revision), percent_encode_path(&f.name));
    let mut last = String::new();
    let mut announced = false;
    for attempt in 0..=opts.max_retries {
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if !announced {
            progress.file(&f.name, f.size.unwrap_or(0), have);
            announced = true;
        }
        let complete = f.size.is_some_and(|s| have == s && s > 0);
        let resp = if complete {
            None
        } else {
            match client.get(&url, have)? {
                Outcome::Ok(r) => Some(r),
                Outcome::Retry(msg, hint) => {
                    last = msg;
                    if attempt < opts.max_retries {
                        std::thread::sleep(backoff(attempt, hint, opts.max_backoff));
                    }
                    continue;
                }
            }
        };
        if let Some(resp) = resp {
            let status = resp.status();
            let mut file = match status {
                206 => {
                    // The server must resume exactly where our part file ends.
                    let start = resp
                        .header("content-range")
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    if start != Some(have) {
                        let _ = std::fs::remove_file(&part);
                        last = format!("{url}: server resumed at {start:?}, expected {have}");
                        continue;
                    }
                    OpenOptions::new().append(true).open(&part).map_err(io_err(&part))?
                }
                200 => File::create(&part).map_err(io_err(&part))?,
                416 => {
                    // Range not satisfiable: our part is already whole (or bogus) — verify below.
                    OpenOptions::new().append(true).create(true).open(&part).map_err(io_err(&part))?
                }
                s => return Err(DownloadError::Http { url: url.clone(), status: s }),
            };
            if status != 416 {
                let mut reader = resp.into_reader();
                let mut buf = vec![0u8; 1 << 20];
                let mut failed = None;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            file.write_all(&buf[..n]).map_err(io_err(&part))?;
                            progress.bytes(n as u64);
                        }
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                file.sync_all().map_err(io_err(&part))?;
                let now = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                if let Some(e) = failed.or_else(|| f.size.filter(|&s| now < s).map(|s| format!("connection closed at {now} of {s} bytes"))) {
                    last = format!("{url}: {e}");
                    if attempt < opts.max_retries {
                        std::thread::sleep(backoff(attempt, None, opts.max_backoff));
                    }
                    continue;
                }
            }
        }
        if let Err(e) = verify(&part, f) {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        std::fs::rename(&part, &dest).map_err(io_err(&dest))?;
        progress.done();
        return Ok(dest);
    }
    Err(DownloadError::Retries { tries: opts.max_retries + 1, last })
}

/// Points `link` at `target` atomically (a new symlink renamed over the old).
/// An existing regular file under the link's name is never replaced.
pub fn point_link(link: &Path, target: &Path) -> Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(link) {
        if !m.file_type().is_symlink() {
            return Err(DownloadError::Invalid(format!("{} exists and is not a symlink; not replacing it", link.display())));
        }
    }
    let tmp = PathBuf::from(format!("{}.tmp-link-{}", link.display(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let abs = std::fs::canonicalize(target).map_err(io_err(target))?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(&abs, &tmp).map_err(io_err(&tmp))?;
    #[cfg(not(unix))]
    return Err(DownloadError::Invalid("symlinks are only supported on Unix".into()));
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(link)(e)
    })
}

/// List, select, fetch every part, link. Returns the downloaded paths.
pub fn download(opts: &DownloadOptions, progress: &dyn DownloadProgress) -> Result<Vec<PathBuf>> {
    let files = list_files(opts)?;
    let chosen = select(&files, opts)?;
    let mut paths = Vec::new();
    for f in &chosen {
        paths.push(fetch_file(opts, f, progress)?);
    }
    if let (Some(link), Some(first)) = (&opts.link, paths.first()) {
        point_link(link, first)?;
    }
    Ok(paths)
}
