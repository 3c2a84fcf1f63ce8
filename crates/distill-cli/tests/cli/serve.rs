//! `distill serve` as users start it: the real binary on a free port, spoken to over HTTP,
//! stopped with SIGTERM as a service manager would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// The server process, killed when dropped so a failed assertion leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
    let model = fixtures().join("tiny-qwen2");
    let child = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "--device",
            "cpu",
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distill serve");
    let mut server = Running(child);
    let mut stdout = BufReader::new(server.0.stdout.take().unwrap()).lines();
    // The first line comes once it listens; EOF instead means it failed to start.
    let banner = stdout.next().and_then(Result::ok).unwrap_or_else(|| {
        let mut err = String::new();
        server.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("no banner; stderr: {err}")
    });
    assert!(
        banner.starts_with("serving `tiny-qwen2` at http://127.0.0.1:"),
        "{banner}"
    );
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
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

    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    server.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "exit {status}; stderr: {log}");
    assert!(log.contains("POST /v1/chat/completions 200"), "{log}");
    assert!(
        !log.contains("secret-prompt-text"),
        "the log holds prompt text: {log}"
    );
}
