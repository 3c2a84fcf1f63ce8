//! A loopback OpenAI-compatible server for tests, scripted per request: status codes,
//! `Retry-After`, slow answers, keep-alive blank lines, malformed JSON, SSE, truncation.
//!
//! It listens on 127.0.0.1 only, serves at most `MAX_REQUESTS` requests and at most
//! `LIFETIME`, and stops when dropped. Every request is recorded (path, Authorization header,
//! JSON body) for assertions.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const MAX_REQUESTS: usize = 20_000;
pub const LIFETIME: Duration = Duration::from_secs(600);

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// 0-based arrival order.
    pub n: usize,
    /// When it arrived.
    pub at: Instant,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

impl Seen {
    /// The content of the last user message.
    pub fn prompt(&self) -> String {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string()
    }

    pub fn seed(&self) -> Option<u64> {
        self.body["seed"].as_u64()
    }
}

/// What to send back.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A status with a body and extra headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Wait, then reply.
    Delay(Duration, Box<Reply>),
    /// A 200 whose body starts with `lines` blank lines sent `every` apart (the DeepSeek API's
    /// keep-alive while a request waits), then `body`.
    KeepAlive {
        lines: usize,
        every: Duration,
        body: String,
    },
    /// Close the connection without answering.
    Drop,
}

impl Reply {
    pub fn ok(body: String) -> Reply {
        Reply::Status {
            status: 200,
            body,
            headers: vec![],
        }
    }

    pub fn status(status: u16, message: &str) -> Reply {
        Reply::Status {
            status,
            body: json!({"error": {"message": message}}).to_string(),
            headers: vec![],
        }
    }

    pub fn retry_after(status: u16, secs: &str) -> Reply {
        Reply::Status {
            status,
            body: json!({"error": {"message": "rate limited"}}).to_string(),
            headers: vec![("Retry-After".into(), secs.into())],
        }
    }
}

/// A DeepSeek-style completion body.
pub fn completion(model: &str, reasoning: &str, content: &str, finish_reason: &str) -> String {
    json!({
        "id": "cmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
            "finish_reason": finish_reason
        }],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 30,
            "total_tokens": 50,
            "prompt_cache_hit_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 25}
        }
    })
    .to_string()
}

/// A correct-looking answer for GSM8K-style prompts of the form "... what is A+B?": used by
/// tests that need deterministic right and wrong answers. Echoes the seed into the reasoning.
pub fn echo_completion(seen: &Seen) -> String {
    let prompt = seen.prompt();
    completion(
        "fake-r1",
        &format!("Thinking about: {prompt} (seed {:?})", seen.seed()),
        &format!("The answer is \\boxed{{{}}}.", sum_in(&prompt).unwrap_or(0)),
        "stop",
    )
}

/// A+B from "... A+B ..." in the text.
pub fn sum_in(text: &str) -> Option<i64> {
    let plus = text.find('+')?;
    let a: String = text[..plus]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let a: i64 = a.chars().rev().collect::<String>().parse().ok()?;
    let b: String = text[plus + 1..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some(a + b.parse::<i64>().ok()?)
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

pub struct FakeTeacher {
    port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTeacher {
    pub fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FakeTeacher {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let count = Arc::new(AtomicUsize::new(0));
            while !stop2.load(Ordering::SeqCst) && started.elapsed() < LIFETIME {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if count.load(Ordering::SeqCst) >= MAX_REQUESTS {
                            break;
                        }
                        let (script, seen, count, stop) =
                            (script.clone(), seen2.clone(), count.clone(), stop2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &*script, &seen, &count, &stop);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeTeacher {
            port,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// The base URL, `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

impl Drop for FakeTeacher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    script: &Script,
    seen: &Mutex<Vec<Seen>>,
    count: &AtomicUsize,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Keep-alive connections: serve requests until the client closes.
    loop {
        let Some((path, headers, body)) = read_request(&mut stream)? else {
            return Ok(());
        };
        let n = count.fetch_add(1, Ordering::SeqCst);
        let req = Seen {
            n,
            at: Instant::now(),
            path,
            authorization: headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v.clone()),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        seen.lock().expect("seen lock").push(req.clone());
        let keep_open = write_reply(&mut stream, script(&req), stop)?;
        if !keep_open {
            return Ok(());
        }
    }
}

type Request = (String, Vec<(String, String)>, Vec<u8>);

fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some((path, headers, body)))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a reply; returns whether the connection may serve another request.
fn write_reply(stream: &mut TcpStream, reply: Reply, stop: &AtomicBool) -> std::io::Result<bool> {
    match reply {
        Reply::Status {
            status,
            body,
            headers,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                reason(status),
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes())?;
            stream.write_all(body.as_bytes())?;
            stream.flush()?;
            Ok(true)
        }
        Reply::Delay(d, then) => {
            let until = Instant::now() + d;
            while Instant::now() < until {
                if stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(5).min(until - Instant::now()));
            }
            write_reply(stream, *then, stop)
        }
        Reply::KeepAlive { lines, every, body } => {
            // No Content-Length: the body runs to the close, as the keep-alive lines precede it.
            stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
            )?;
            for _ in 0..lines {
                stream.write_all(b"\n")?;
                stream.flush()?;
                std::thread::sleep(every);
            }
            stream.write_all(body.as_bytes())?;
            stream.flush()?;
            Ok(false)
        }
        Reply::Drop => Ok(false),
    }
}
