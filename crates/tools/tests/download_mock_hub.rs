//! The downloader against a local HTTP server that mimics the Hugging Face
//! Hub's endpoints (listing with LFS sha256, resolve → redirect to a CDN on
//! another origin, Range requests), including interrupted transfers, wrong
//! checksums, 401 / 404 / 429, and hostile tokens and file names.
//! Only loopback traffic: the server listens on 127.0.0.1:0.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsv4_tools::download::{self, DownloadError, DownloadOptions, Quiet, Target, Token};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug)]
struct Req {
    host: String,
    path: String,
    auth: Option<String>,
    range: Option<String>,
}

#[derive(Default)]
struct State {
    log: Vec<Req>,
    hits: HashMap<String, usize>,
}

const GOOD: &str = "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8.gguf";

fn payload() -> Vec<u8> {
    (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

struct Hub {
    port: u16,
    state: Arc<Mutex<State>>,
}

fn listing(files: &[(&str, usize, &str)]) -> String {
    let sib: Vec<String> = files
        .iter()
        .map(|(n, size, h)| format!(r#"{{"rfilename":{},"size":{size},"lfs":{{"sha256":"{h}","size":{size},"pointerSize":134}}}}"#, serde_json::to_string(n).unwrap()))
        .collect();
    format!(r#"{{"id":"x","siblings":[{}]}}"#, sib.join(","))
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = s.write_all(h.as_bytes());
    let _ = s.write_all(body);
}

fn handle(mut s: TcpStream, port: u16, state: Arc<Mutex<State>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut hdr = HashMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).is_err() || l == "\r\n" || l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdr.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Req { host: hdr.get("host").cloned().unwrap_or_default(), path: path.clone(), auth: hdr.get("authorization").cloned(), range: hdr.get("range").cloned() };
    let n = {
        let mut st = state.lock().unwrap();
        st.log.push(req.clone());
        let c = st.hits.entry(path.clone()).or_insert(0);
        *c += 1;
        *c
    };
    let data = payload();
    let good_sha = sha(&data);
    let cdn = format!("http://localhost:{port}/cdn");
    match path.as_str() {
        "/api/models/ok/repo/revision/main?blobs=true" => {
            respond(&mut s, "200 OK", &[], listing(&[(GOOD, data.len(), &good_sha), ("README.md", 10, &good_sha)]).as_bytes())
        }
        "/api/models/busy/repo/revision/main?blobs=true" if n == 1 => respond(&mut s, "429 Too Many Requests", &[("Retry-After", "0".into())], b""),
        "/api/models/busy/repo/revision/main?blobs=true" => respond(&mut s, "200 OK", &[], listing(&[(GOOD, data.len(), &good_sha)]).as_bytes()),
        "/api/models/bad/sum/revision/main?blobs=true" => respond(&mut s, "200 OK", &[], listing(&[(GOOD, data.len(), &"0".repeat(64))]).as_bytes()),
        "/api/models/gone/repo/revision/main?blobs=true" => respond(&mut s, "200 OK", &[], listing(&[("missing-IQ2XXS.gguf", 5, &good_sha)]).as_bytes()),
        "/api/models/evil/names/revision/main?blobs=true" => respond(&mut s, "200 OK", &[], listing(&[("../../escape-IQ2XXS.gguf", data.len(), &good_sha)]).as_bytes()),
        "/api/models/private/repo/revision/main?blobs=true" => {
            if req.auth.as_deref() == Some("Bearer hf_good") {
                respond(&mut s, "200 OK", &[], listing(&[(GOOD, data.len(), &good_sha)]).as_bytes())
            } else {
                respond(&mut s, "401 Unauthorized", &[], b"")
            }
        }
        p if p.starts_with("/ok/repo/resolve/main/")
            || p.starts_with("/busy/repo/resolve/main/")
            || p.starts_with("/bad/sum/resolve/main/")
            || p.starts_with("/private/repo/resolve/main/") =>
        {
            let file = p.rsplit('/').next().unwrap();
            respond(&mut s, "302 Found", &[("Location", format!("{cdn}/{file}"))], b"")
        }
        p if p.starts_with("/cdn/") => {
            let start: usize = req.range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse().ok()).unwrap_or(0);
            let body = &data[start.min(data.len())..];
            if start > 0 {
                let h = format!("HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n\r\n", body.len(), data.len() - 1, data.len());
                let _ = s.write_all(h.as_bytes());
                let _ = s.write_all(body);
            } else if n == 1 {
                // First transfer dies half way (Content-Length promises more).
                let h = format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = s.write_all(h.as_bytes());
                let _ = s.write_all(&body[..body.len() / 2]);
                let _ = s.flush();
                let _ = s.shutdown(std::net::Shutdown::Both);
            } else {
                respond(&mut s, "200 OK", &[], body);
            }
        }
        _ => respond(&mut s, "404 Not Found", &[], b"not found"),
    }
}

fn hub() -> Hub {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let state = Arc::new(Mutex::new(State::default()));
    let st = state.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let st = st.clone();
            std::thread::spawn(move || handle(c, port, st));
        }
    });
    Hub { port, state }
}

fn opts(h: &Hub, repo: &str, dir: &Path) -> DownloadOptions {
    DownloadOptions {
        target: Target::Q2,
        repo: repo.into(),
        revision: "main".into(),
        dir: dir.to_path_buf(),
        token: None,
        endpoint: format!("http://127.0.0.1:{}", h.port),
        file: None,
        link: Some(dir.join("dsv4flash.gguf")),
        max_retries: 4,
        max_backoff: Duration::from_millis(20),
    }
}

#[test]
fn interrupted_redirected_download_resumes_verifies_and_links() {
    let h = hub();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(&h, "ok/repo", tmp.path());
    o.token = Some(Token::new("hf_secret_token").unwrap());
    let paths = download::download(&o, &Quiet).unwrap();
    assert_eq!(paths, vec![tmp.path().join(GOOD)]);
    assert_eq!(std::fs::read(&paths[0]).unwrap(), payload());
    let link = tmp.path().join("dsv4flash.gguf");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&link).unwrap(), payload());
    assert!(!tmp.path().join(format!("{GOOD}.part")).exists());
    let log = h.state.lock().unwrap().log.clone();
    let cdn: Vec<&Req> = log.iter().filter(|r| r.path.starts_with("/cdn/")).collect();
    assert!(cdn.len() >= 2, "expected a resumed transfer: {log:?}");
    assert_eq!(cdn[1].range.as_deref(), Some("bytes=100000-"), "second CDN request resumes with Range");
    for r in &log {
        if r.host.starts_with("localhost") {
            assert!(r.auth.is_none(), "token leaked to another origin: {}", r.path);
        } else {
            assert_eq!(r.auth.as_deref(), Some("Bearer hf_secret_token"));
        }
        assert!(!r.path.contains("hf_secret_token"));
    }
    // A second run finds the verified file and only re-points the link.
    let again = download::download(&o, &Quiet).unwrap();
    assert_eq!(again, paths);
}

#[test]
fn resume_from_a_previous_runs_part_file() {
    let h = hub();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(format!("{GOOD}.part")), &payload()[..50_000]).unwrap();
    let o = opts(&h, "ok/repo", tmp.path());
    download::download(&o, &Quiet).unwrap();
    assert_eq!(std::fs::read(tmp.path().join(GOOD)).unwrap(), payload());
    let log = h.state.lock().unwrap().log.clone();
    assert_eq!(log.iter().find(|r| r.path.starts_with("/cdn/")).unwrap().range.as_deref(), Some("bytes=50000-"));
}

#[test]
fn rate_limit_is_retried() {
    let h = hub();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&h, "busy/repo", tmp.path());
    download::download(&o, &Quiet).unwrap();
    assert_eq!(std::fs::read(tmp.path().join(GOOD)).unwrap(), payload());
}

#[test]
fn wrong_checksum_fails_and_leaves_nothing() {
    let h = hub();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&h, "bad/sum", tmp.path());
    let e = download::download(&o, &Quiet).unwrap_err();
    assert!(matches!(e, DownloadError::Checksum { .. }), "{e}");
    assert!(!tmp.path().join(GOOD).exists());
    assert!(!tmp.path().join(format!("{GOOD}.part")).exists());
    assert!(!tmp.path().join("dsv4flash.gguf").exists());
}

#[test]
fn unauthorised_and_not_found() {
    let h = hub();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(&h, "private/repo", tmp.path());
    let e = download::download(&o, &Quiet).unwrap_err();
    assert!(matches!(e, DownloadError::Auth { status: 401, .. }), "{e}");
    o.token = Some(Token::new("hf_good").unwrap());
    download::download(&o, &Quiet).unwrap();
    let o = opts(&h, "gone/repo", tmp.path());
    let e = download::download(&o, &Quiet).unwrap_err();
    assert!(matches!(e, DownloadError::NotFound { .. }), "{e}");
    let o = opts(&h, "nosuch/repo", tmp.path());
    assert!(matches!(download::download(&o, &Quiet).unwrap_err(), DownloadError::NotFound { .. }));
}

#[test]
fn hostile_file_names_are_refused() {
    let h = hub();
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("a/b");
    std::fs::create_dir_all(&dir).unwrap();
    let o = opts(&h, "evil/names", &dir);
    let e = download::download(&o, &Quiet).unwrap_err();
    assert!(matches!(e, DownloadError::UnsafeName(_)), "{e}");
    assert!(!outer.path().join("escape-IQ2XXS.gguf").exists());
    for bad in ["../../x", "/etc/passwd", "a/../../x", "..", "a\\b", "C:x", "a/\u{0}b", "a\nb", ".hidden", "a//b", ""] {
        assert!(download::validate_remote_name(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["model.gguf", "q2/model-00001-of-00002.gguf"] {
        download::validate_remote_name(good).unwrap();
    }
    for bad in ["../x", "a/b/c", "a", "a/..", "a/b c"] {
        assert!(download::validate_repo(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn hostile_tokens_never_reach_a_shell_or_a_second_header() {
    for bad in ["; touch HACKED;", "$(touch HACKED)", "tok\nX-Evil: 1", "tok\r\nHost: evil", "a b", "", "\u{7f}"] {
        let e = Token::new(bad).unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains("HACKED") && !msg.contains("Evil"), "error echoes the token: {msg}");
    }
    // Shell metacharacters without spaces are legal header bytes: sent verbatim, only as a header.
    let h = hub();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(&h, "ok/repo", tmp.path());
    let t = Token::new("$(touch${IFS}HACKED);`id`").unwrap();
    assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    o.token = Some(t);
    download::download(&o, &Quiet).unwrap();
    assert!(!tmp.path().join("HACKED").exists() && !Path::new("HACKED").exists());
    let log = h.state.lock().unwrap().log.clone();
    assert!(log.iter().any(|r| r.auth.as_deref() == Some("Bearer $(touch${IFS}HACKED);`id`")));
}

#[test]
fn target_matching() {
    let q2 = "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8.gguf";
    let q2i = "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-imatrix.gguf";
    let q4 = "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out.gguf";
    let mtp = "DeepSeek-V4-Flash-MTP-Q8.gguf";
    assert!(Target::Q2.matches(q2) && !Target::Q2.matches(q2i) && !Target::Q2.matches(q4) && !Target::Q2.matches(mtp));
    assert!(Target::Q2Imatrix.matches(q2i) && !Target::Q2Imatrix.matches(q2));
    assert!(Target::Q4.matches(q4) && !Target::Q4.matches(q2) && !Target::Q4.matches(mtp));
    assert!(Target::Mtp.matches(mtp) && !Target::Mtp.matches(q4));
}
