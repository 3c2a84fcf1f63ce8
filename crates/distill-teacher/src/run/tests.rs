//! The loop against a scripted loopback teacher: every fault the issue lists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distill_data::{ErrorRecord, Message, Prompt, Sample};

use super::*;
use crate::api::Sampling;
use crate::fleet::{EndpointSpec, Fleet, FleetPolicy};
use crate::plan::plan;
use crate::testing::{FakeTeacher, Reply, Seen, completion, echo_completion};

const KEY: &str = "sk-loopback-SECRET-0123456789";

fn setup(n: u32) -> RequestSetup {
    RequestSetup {
        model: "deepseek-reasoner".into(),
        sampling: Sampling {
            temperature: 0.6,
            top_p: 0.95,
            max_tokens: 256,
            stop: vec![],
            seed: Some(1),
        },
        system_prompt: None,
        prompt_suffix: String::new(),
        n,
    }
}

fn opts(n: u32) -> RunOptions {
    RunOptions {
        setup: setup(n),
        stream: false,
        concurrency: 4,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        max_retries: 3,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(40),
        max_retry_after: Duration::from_secs(2),
        prices: Prices {
            prompt_per_m: 1.0,
            cached_prompt_per_m: Some(0.5),
            completion_per_m: 2.0,
        },
        max_cost: None,
        max_tokens: None,
        rejection_limit: 5,
        top_logprobs: None,
    }
}

/// Prompt i asks "Case i: what is i+1?" with reference 2i+1.
fn prompts(count: usize) -> Vec<Prompt> {
    (0..count)
        .map(|i| Prompt {
            id: i.to_string(),
            messages: vec![Message::new("user", format!("Case {i}: what is {i}+{}?", i + 1))],
            reference: Some((2 * i + 1).to_string()),
        })
        .collect()
}

fn case_of(seen: &Seen) -> usize {
    let p = seen.prompt();
    p["Case ".len()..p.find(':').unwrap()].parse().unwrap()
}

fn fleet(urls: &[String], policy: FleetPolicy) -> Arc<Fleet> {
    Arc::new(Fleet::new(
        urls.iter()
            .map(|u| EndpointSpec {
                base_url: u.clone(),
                api_key: Some(ApiKey::new(KEY)),
            })
            .collect(),
        policy,
    ))
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn assert_key_nowhere(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(KEY) && !text.contains("SECRET"),
            "API key in {}",
            path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_is_retried_or_recorded_as_the_issue_says() {
    let tries: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let t = tries.clone();
    let server = FakeTeacher::start(move |seen| {
        let case = case_of(seen);
        let attempt = {
            let mut t = t.lock().unwrap();
            let e = t.entry(case).or_insert(0);
            *e += 1;
            *e
        };
        let ok = Reply::ok(echo_completion(seen));
        match (case, attempt) {
            (0, 1) => Reply::retry_after(429, "0.2"),
            (1, 1 | 2) => Reply::status(503, "overloaded"),
            (2, _) => Reply::Delay(Duration::from_millis(300), Box::new(ok)),
            (3, 1) => Reply::ok("{\"choices\": [{\"message\": {\"content\": \"trunc".into()),
            (4, _) => Reply::KeepAlive {
                lines: 5,
                every: Duration::from_millis(20),
                body: echo_completion(seen),
            },
            (5, _) => Reply::ok(completion("fake-r1", "and so on and so", "", "length")),
            (6, _) => Reply::status(400, "context too long"),
            (7, _) => Reply::status(503, "still overloaded"),
            (8, _) => Reply::ok(completion("fake-r1", "hmm", "It is \\boxed{99}.", "stop")),
            (9, _) => Reply::status(
                401,
                &format!("invalid key {}", seen.authorization.clone().unwrap_or_default()),
            ),
            (10, _) => Reply::ok(format!(
                ": keep-alive\n\ndata: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
                serde_json::json!({"model": "fake-r1", "choices": [{"delta": {"reasoning_content": "ten plus eleven"}}]}),
                serde_json::json!({"choices": [{"delta": {"content": "\\boxed{21}"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 20, "completion_tokens": 30}}),
            )),
            (11, 1) => Reply::Drop,
            (12, 1) => Reply::Status {
                status: 200,
                body: "{\"error\": {\"message\": \"upstream died\"}}".into(),
                headers: vec![],
            },
            _ => ok,
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(dir.path(), vec![ApiKey::new(KEY)]).unwrap();
    let jobs = plan(&prompts(14), &setup(1)).jobs;
    let out = run(
        jobs.clone(),
        fleet(&[server.url()], FleetPolicy::default()),
        &mut ledger,
        &opts(1),
        Arc::new(Silent),
        Stop::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.stop, StopReason::Finished);
    assert_eq!(
        (out.started, out.succeeded, out.failed, out.abandoned),
        (14, 11, 3, 0)
    );

    let tries = tries.lock().unwrap().clone();
    let want: HashMap<usize, usize> = [
        (0, 2),
        (1, 3),
        (2, 1),
        (3, 2),
        (4, 1),
        (5, 1),
        (6, 1),
        (7, 4),
        (8, 1),
        (9, 1),
        (10, 1),
        (11, 2),
        (12, 2),
        (13, 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(tries, want, "attempts per case");
    assert_eq!(out.retries, 1 + 2 + 1 + 3 + 1 + 1);

    // Retry-After: 0.2 s was honoured (not the 5 ms backoff).
    let reqs = server.requests();
    let at: Vec<_> = reqs.iter().filter(|s| case_of(s) == 0).map(|s| s.at).collect();
    assert!(at[1] - at[0] >= Duration::from_millis(190), "{:?}", at[1] - at[0]);
    // The key went out as a header, to the right path, with the sampling parameters.
    assert!(
        reqs.iter()
            .all(|s| s.authorization.as_deref() == Some(&format!("Bearer {KEY}")[..]))
    );
    assert!(reqs.iter().all(|s| s.path == "/v1/chat/completions"));
    assert_eq!(reqs[0].body["temperature"], 0.6);
    assert_eq!(reqs[0].body["max_tokens"], 256);
    drop(ledger);

    let samples: Vec<Sample> = read_lines(&dir.path().join("samples-00000.jsonl"));
    assert_eq!(samples.len(), 11);
    let by_case: HashMap<String, &Sample> = samples.iter().map(|s| (s.prompt_id.clone(), s)).collect();
    let s0 = by_case["0"];
    assert_eq!(
        (s0.attempts, s0.correct, s0.extracted.as_deref()),
        (2, Some(true), Some("1"))
    );
    assert_eq!(s0.messages.len(), 2);
    assert!(
        s0.messages[1]
            .content
            .starts_with("<think>\nThinking about: Case 0")
    );
    assert!(
        s0.messages[1]
            .content
            .ends_with("</think>\n\nThe answer is \\boxed{1}.")
    );
    assert_eq!(s0.usage.cached_tokens, Some(5));
    assert_eq!(s0.teacher_model, "fake-r1");
    assert!(by_case["5"].truncated && by_case["5"].finish_reason == "length");
    assert_eq!(by_case["5"].correct, Some(false));
    assert_eq!(by_case["8"].correct, Some(false));
    assert_eq!(by_case["10"].reasoning, "ten plus eleven");
    assert_eq!(by_case["10"].correct, Some(true));
    assert_eq!(by_case["4"].correct, Some(true));
    assert!(by_case["2"].latency_s >= 0.3);

    let errors: Vec<ErrorRecord> = read_lines(&dir.path().join("errors.jsonl"));
    let mut e: Vec<(String, Option<u16>, u32)> = errors
        .iter()
        .map(|e| (e.prompt_id.clone(), e.status, e.attempts))
        .collect();
    e.sort();
    assert_eq!(
        e,
        [
            ("6".into(), Some(400), 1),
            ("7".into(), Some(503), 4),
            ("9".into(), Some(401), 1)
        ]
    );
    let e9 = errors.iter().find(|e| e.prompt_id == "9").unwrap();
    assert!(e9.message.contains("invalid key Bearer ***"), "{}", e9.message);
    assert_key_nowhere(dir.path());

    // A restart sends nothing; --retry-failed sends the three failures again.
    let before = server.requests().len();
    let mut ledger = Ledger::open(dir.path(), vec![]).unwrap();
    let (todo, done, failed) = pending(jobs.clone(), &ledger, false);
    assert_eq!((todo.len(), done, failed), (0, 11, 3));
    let (todo, _, _) = pending(jobs, &ledger, true);
    assert_eq!(todo.len(), 3);
    let out = run(
        todo,
        fleet(&[server.url()], FleetPolicy::default()),
        &mut ledger,
        &opts(1),
        Arc::new(Silent),
        Stop::new(),
    )
    .await
    .unwrap();
    assert_eq!((out.succeeded, out.failed), (0, 3));
    assert_eq!(server.requests().len() - before, 1 + 4 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_required_stops_cleanly_and_keeps_everything() {
    let server = FakeTeacher::start(|seen| {
        if seen.n < 3 {
            Reply::ok(echo_completion(seen))
        } else {
            Reply::status(402, "Insufficient Balance")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(dir.path(), vec![]).unwrap();
    let jobs = plan(&prompts(10), &setup(1)).jobs;
    let o = RunOptions {
        concurrency: 1,
        ..opts(1)
    };
    let out = run(
        jobs,
        fleet(&[server.url()], FleetPolicy::default()),
        &mut ledger,
        &o,
        Arc::new(Silent),
        Stop::new(),
    )
    .await
    .unwrap();
    match &out.stop {
        StopReason::PaymentRequired { message, .. } => {
            assert!(message.contains("Insufficient Balance"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((out.succeeded, out.failed), (3, 0));
    assert_eq!(
        server.requests().len(),
        4,
        "402 must not be retried nor more requests sent"
    );
    assert_eq!(ledger.totals().samples, 3);
    assert!(
        !dir.path().join("errors.jsonl").exists()
            || read_lines::<ErrorRecord>(&dir.path().join("errors.jsonl")).is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_stop_at_the_limit() {
    let server = FakeTeacher::start(|seen| Reply::ok(echo_completion(seen)));
    // Each sample: 20 prompt (5 cached) + 30 completion tokens = 50 tokens,
    // cost (15·1 + 5·0.5 + 30·2)/1e6 = 77.5e-6 USD.
    for (o, want) in [
        (
            RunOptions {
                concurrency: 1,
                max_tokens: Some(200),
                ..opts(1)
            },
            4,
        ),
        (
            RunOptions {
                concurrency: 1,
                max_cost: Some(77.5e-6 * 3.0 - 1e-9),
                ..opts(1)
            },
            3,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![]).unwrap();
        let out = run(
            plan(&prompts(10), &setup(1)).jobs,
            fleet(&[server.url()], FleetPolicy::default()),
            &mut ledger,
            &o,
            Arc::new(Silent),
            Stop::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.succeeded, want, "{:?}", out.stop);
        assert!(
            matches!(
                out.stop,
                StopReason::MaxTokens { .. } | StopReason::MaxCost { .. }
            ),
            "{:?}",
            out.stop
        );
        assert!((o.prices.cost_of(ledger.totals()) - 77.5e-6 * want as f64).abs() < 1e-12);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_routes_around_a_dead_endpoint() {
    let good = FakeTeacher::start(|seen| {
        Reply::Delay(
            Duration::from_millis(20),
            Box::new(Reply::ok(echo_completion(seen))),
        )
    });
    let flaky = FakeTeacher::start(|seen| {
        Reply::Delay(
            Duration::from_millis(20),
            Box::new(Reply::ok(echo_completion(seen))),
        )
    });
    // A port with nothing listening: connection refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}/v1", l.local_addr().unwrap().port())
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(dir.path(), vec![]).unwrap();
    let policy = FleetPolicy {
        fail_threshold: 2,
        cooldown: Duration::from_millis(100),
        max_cooldown: Duration::from_millis(400),
    };
    let f = fleet(&[good.url(), dead.clone(), flaky.url()], policy);
    let out = run(
        plan(&prompts(40), &setup(2)).jobs,
        f.clone(),
        &mut ledger,
        &opts(2),
        Arc::new(Silent),
        Stop::new(),
    )
    .await
    .unwrap();
    assert_eq!((out.succeeded, out.failed), (80, 0));
    let (g, fl) = (good.requests().len(), flaky.requests().len());
    assert_eq!(g + fl, 80);
    assert!(g >= 20 && fl >= 20, "load not spread: {g} vs {fl}");
    // The dead endpoint was tried (threshold, then probes) but never got most of the work.
    assert!(
        f.served(1) >= 2 && f.served(1) < 20,
        "dead endpoint served {}",
        f.served(1)
    );
    assert!(f.is_set_aside(1));
}

#[test]
fn retry_after_and_backoff() {
    assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
    assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
        Some(Duration::ZERO)
    );
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
    let d = parse_retry_after(&later).unwrap();
    assert!(
        d > Duration::from_secs(28) && d <= Duration::from_secs(30),
        "{d:?}"
    );
    assert_eq!(parse_retry_after("soon"), None);
    for attempt in 1..8 {
        let d = backoff(Duration::from_millis(100), Duration::from_secs(1), attempt);
        let cap = (100u64 << (attempt - 1)).min(1000);
        assert!(
            d >= Duration::from_millis(cap / 2) && d <= Duration::from_millis(cap),
            "{attempt}: {d:?}"
        );
    }
}

/// Records what it saw; refuses once it has seen `refuse_after` samples.
struct Recorder {
    seen: Vec<(String, Option<usize>)>,
    refuse_after: usize,
}

impl SampleHook for Recorder {
    fn before_append(
        &mut self,
        sample: &Sample,
        logprobs: Option<&[TokenLogprob]>,
    ) -> Result<Option<String>, TeacherError> {
        if self.seen.len() >= self.refuse_after {
            return Ok(Some("tokens do not map".into()));
        }
        self.seen.push((sample.key.clone(), logprobs.map(<[_]>::len)));
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_hook_sees_logprobs_first_and_can_stop_the_run() {
    let server = FakeTeacher::start(|seen| {
        let mut body: serde_json::Value = serde_json::from_str(&echo_completion(seen)).unwrap();
        body["choices"][0]["logprobs"] = serde_json::json!({"content": [
            {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.1}]},
            {"token": "b", "logprob": -0.2, "top_logprobs": []}]});
        Reply::ok(body.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(dir.path(), vec![]).unwrap();
    let mut o = opts(1);
    o.concurrency = 1;
    o.top_logprobs = Some(5);
    let mut hook = Recorder {
        seen: Vec::new(),
        refuse_after: 2,
    };
    let out = run_with(
        plan(&prompts(6), &setup(1)).jobs,
        fleet(&[server.url()], FleetPolicy::default()),
        &mut ledger,
        &o,
        Arc::new(Silent),
        Stop::new(),
        Some(&mut hook),
    )
    .await
    .unwrap();
    assert_eq!(
        out.stop,
        StopReason::Refused {
            message: "tokens do not map".into()
        }
    );
    assert_eq!(out.succeeded, 2);
    assert_eq!(hook.seen.len(), 2);
    assert!(hook.seen.iter().all(|(k, n)| ledger.is_done(k) && *n == Some(2)));
    // The refused sample is not in the ledger: a rerun sends it again.
    assert_eq!(ledger.totals().samples, 2);
    let reqs = server.requests();
    assert!(
        reqs.iter()
            .all(|r| r.body["logprobs"] == true && r.body["top_logprobs"] == 5)
    );
}
