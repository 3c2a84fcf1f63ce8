//! `distill serve` as users start it: the real binary on a free port, spoken to over HTTP,
//! stopped with SIGTERM as a service manager would.

use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A running `distill serve`, killed when dropped so a failed assertion leaves nothing running.
pub(super) struct Served {
    pub child: Child,
    /// The first line it prints, once it listens: "serving `name` at http://.../v1".
    pub banner: String,
    /// The base URL from the banner (`http://127.0.0.1:PORT/v1`).
    pub url: String,
    /// The rest of its stdout. Whoever takes it must keep reading: a closed pipe would fail
    /// the server's next print.
    pub stdout: Option<Lines<BufReader<ChildStdout>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `distill serve --device cpu` for `model` on a free port and waits for its banner.
pub(super) fn start(model: &Path) -> Served {
    start_with(model, &[])
}

/// [`start`] with more of serve's flags.
fn start_with(model: &Path, flags: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "--device",
            "cpu",
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
        ])
        .args(flags)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distill serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first line comes once it listens; EOF instead means it failed to start.
    let Some(banner) = stdout.next().and_then(Result::ok) else {
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let _ = child.kill();
        panic!("distill serve did not start: {err}");
    };
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in the banner: {banner}"))
        .to_string();
    Served {
        child,
        banner,
        url,
        stdout: Some(stdout),
    }
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok());
    let (_, body) = response.split_once("\r\n\r\n").unwrap_or_default();
    (
        status.unwrap_or_else(|| panic!("not HTTP: {response}")),
        body.to_string(),
    )
}

#[test]
fn serve_answers_models_and_chat_and_stops_on_sigterm() {
    let mut server = start(&fixtures().join("tiny-qwen2"));
    let (banner, url) = (server.banner.clone(), server.url.clone());
    assert!(
        banner.starts_with("serving `tiny-qwen2` at http://127.0.0.1:"),
        "{banner}"
    );
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let mut stdout = server.stdout.take().unwrap();
    let example = stdout.next().unwrap().unwrap();
    assert!(
        example.contains(&format!("curl {url}/chat/completions")),
        "{example}"
    );

    let (status, body) = http(&addr, "GET", "/v1/models", "");
    assert_eq!(status, 200, "{body}");
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-qwen2");

    let secret = "What is 17 * 23? secret-prompt-text";
    let request = serde_json::json!({"model": "tiny-qwen2", "messages": [{"role": "user", "content": secret}],
                                     "max_tokens": 4, "temperature": 0});
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", &request.to_string());
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 4);

    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "exit {status}; stderr: {log}");
    assert!(log.contains("POST /v1/chat/completions 200"), "{log}");
    assert!(
        !log.contains("secret-prompt-text"),
        "the log holds prompt text: {log}"
    );
}

/// `--kv-cache-gib` is reported at start as positions and full-length sequences at once, and
/// one that cannot hold a --max-model-len sequence stops serve before it listens.
#[test]
fn serve_reports_its_kv_cache_budget_and_refuses_one_too_small() {
    // tiny-qwen2's cache takes 512 bytes a position: 1,024 positions.
    let gib = format!("{}", 1024.0 * 512.0 / (1u64 << 30) as f64);
    let mut server = start_with(
        &fixtures().join("tiny-qwen2"),
        &["--max-model-len", "256", "--kv-cache-gib", &gib],
    );
    let mut stdout = server.stdout.take().unwrap();
    let _example = stdout.next().unwrap().unwrap();
    let budget = stdout.next().unwrap().unwrap();
    assert_eq!(
        budget,
        "  KV cache: 1024 positions (--kv-cache-gib), 4.0 sequences of --max-model-len 256 at once"
    );
    drop(server);

    let o = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "--device",
            "cpu",
            "serve",
            "--port",
            "0",
            "--kv-cache-gib",
            "0.00001",
            "--model",
        ])
        .arg(fixtures().join("tiny-qwen2"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    // After the "loading" line, the refusal in one line.
    assert!(!o.status.success());
    let err = stderr(&o);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains(
                "--kv-cache-gib: 0.00001 GiB holds 20 positions, fewer than one sequence of 512 needs (576)"
            ),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");
}
