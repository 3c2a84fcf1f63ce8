//! The model's thread: it owns the model, takes work from a channel, and batches what is
//! pending. All pending generate work shares one `generate` call, whatever its decoding
//! settings, and work that arrives while it runs joins it; each request keeps its own
//! settings and seed, so its output does not depend on its company. HTTP handlers wait on a
//! oneshot reply (or, streaming, on a channel of tokens) and never on each other.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use burn::tensor::DType;
use burn::tensor::activation::log_softmax;
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{
    BatchLimits, Decoding, Event, Generation, Request, Sampling, TokenLogprob, generate_admitting,
};
use distill_infer::{InferError, host};
use distill_models::{CausalLm, Kernels};
use tokio::sync::{mpsc, oneshot};

/// Prompt positions per scoring chunk: bounds the [chunk, V] f32 log-probabilities
/// (152k vocabulary: 150 MB), as distill-eval's teacher forcing does.
const SCORE_CHUNK: usize = 256;

/// How a request's new tokens are chosen. Each row of a generate call keeps its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    /// Decode past EOS tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

/// Why work failed; the handler answers 500 with it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

impl From<InferError> for EngineError {
    fn from(e: InferError) -> Self {
        EngineError(e.to_string())
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Where the generations of one HTTP request go.
pub enum Answer {
    /// Every choice at once, when the last one finishes.
    Whole(Reply<Vec<Generation>>),
    /// Each token as it is drawn, then each choice's generation as it finishes; the sender
    /// is dropped once every choice has finished (or after `Failed`).
    Stream(mpsc::UnboundedSender<Streamed>),
}

/// What a streaming request hears from the engine.
#[derive(Debug)]
pub enum Streamed {
    /// Choice `index` drew `token` (never an EOS token).
    Token {
        index: usize,
        token: u32,
        logprob: Option<TokenLogprob>,
    },
    /// Choice `index` finished: its text cut before any stop string, its reason, its tokens.
    Done { index: usize, generation: Generation },
    /// The model failed; nothing more comes.
    Failed(EngineError),
}

impl Answer {
    /// The client went away: nobody would read the answer.
    fn closed(&self) -> bool {
        match self {
            Answer::Whole(reply) => reply.is_closed(),
            Answer::Stream(tx) => tx.is_closed(),
        }
    }

    fn fail(self, e: EngineError) {
        match self {
            Answer::Whole(reply) => {
                let _ = reply.send(Err(e));
            }
            Answer::Stream(tx) => {
                let _ = tx.send(Streamed::Failed(e));
            }
        }
    }
}

/// The requests of one HTTP request, where their generations go, and how they decode.
type Member = (Vec<Request>, Answer, Decoding);

/// One unit of work for the model thread.
pub enum Work {
    /// Continue each of `requests` (the `n` choices of one HTTP request).
    Generate {
        requests: Vec<Request>,
        params: Params,
        answer: Answer,
    },
    /// Teacher-force a prompt: per position after the first, its log-probability, rank and
    /// the `top` most likely tokens.
    Score {
        prompt: Vec<u32>,
        top: usize,
        reply: Reply<Vec<PositionScore>>,
    },
}

impl Work {
    /// Sequences this work adds to a batch.
    fn sequences(&self) -> usize {
        match self {
            Work::Generate { requests, .. } => requests.len(),
            Work::Score { .. } => 1,
        }
    }

    /// The client went away: nobody would read the answer.
    fn abandoned(&self) -> bool {
        match self {
            Work::Generate { answer, .. } => answer.closed(),
            Work::Score { reply, .. } => reply.is_closed(),
        }
    }
}

/// A prompt token as the model saw it coming.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionScore {
    pub token: u32,
    pub logprob: f32,
    /// 1 + the number of tokens the model found strictly more likely (vLLM's rank).
    pub rank: usize,
    /// (id, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Counters for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub generate_calls: AtomicUsize,
    pub sequences: AtomicUsize,
    pub new_tokens: AtomicUsize,
    pub score_calls: AtomicUsize,
    /// Sequences dropped because their client went away, before or during generation.
    pub cancelled: AtomicUsize,
    /// Rows set aside to keep within `--kv-cache-gib`, prefilled again later.
    pub preemptions: AtomicUsize,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub generate_calls: usize,
    pub sequences: usize,
    pub new_tokens: usize,
    pub score_calls: usize,
    pub cancelled: usize,
    pub preemptions: usize,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            generate_calls: self.generate_calls.load(Ordering::Relaxed),
            sequences: self.sequences.load(Ordering::Relaxed),
            new_tokens: self.new_tokens.load(Ordering::Relaxed),
            score_calls: self.score_calls.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            preemptions: self.preemptions.load(Ordering::Relaxed),
        }
    }
}

/// How the model thread batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most sequences decoded at once; a round takes up to `ROUND_BATCHES` times as many.
    pub batch_size: usize,
    /// Most positions their KV cache holds ([`BatchLimits`]); None: no limit.
    pub kv_cache_tokens: Option<usize>,
    /// After the first request of an idle spell, how long to wait for company.
    pub window: Duration,
}

pub struct Engine<B: Kernels> {
    pub model: CausalLm<B>,
    pub tokenizer: Arc<TextTokenizer>,
    pub eos: Vec<u32>,
    pub device: B::Device,
    pub batching: Batching,
    pub stats: Arc<Stats>,
}

impl<B: Kernels> Engine<B> {
    /// Serves work until every sender is gone.
    pub fn run(&self, jobs: &Receiver<Work>) {
        let mut queue: VecDeque<Work> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match jobs.recv() {
                    Ok(w) => queue.push_back(w),
                    Err(_) => return,
                }
                self.gather(jobs, &mut queue, Instant::now() + self.batching.window);
            } else {
                self.gather(jobs, &mut queue, Instant::now());
            }
            // Up to ROUND_BATCHES batches of work per round: `generate` runs batch_size rows
            // at a time and starts waiting ones as rows finish (continuous batching).
            let round = take_round(&mut queue, self.batching.batch_size * ROUND_BATCHES);
            self.run_round(round, &mut queue, jobs);
        }
    }

    /// Moves arriving work into the queue until the batch is full or `until` passes.
    fn gather(&self, jobs: &Receiver<Work>, queue: &mut VecDeque<Work>, until: Instant) {
        while queue.iter().map(Work::sequences).sum::<usize>() < self.batching.batch_size {
            let wait = until.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(wait) {
                Ok(w) => queue.push_back(w),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The model's settings for `params`: its EOS ids unless the request ignores them.
    fn decoding(&self, params: Params) -> Decoding {
        Decoding {
            max_new_tokens: params.max_new_tokens,
            sampling: params.sampling,
            stop: params.stop,
            eos: if params.ignore_eos {
                Vec::new()
            } else {
                self.eos.clone()
            },
            logprobs: params.logprobs,
        }
    }

    /// Scores the round's prompts, then runs all its generate work in one call, which takes
    /// in queued generate work as rows free up.
    fn run_round(&self, round: Vec<Work>, queue: &mut VecDeque<Work>, jobs: &Receiver<Work>) {
        let mut members: Vec<Member> = Vec::new();
        let (gone, round): (Vec<Work>, Vec<Work>) = round.into_iter().partition(Work::abandoned);
        let dropped: usize = gone.iter().map(Work::sequences).sum();
        self.stats.cancelled.fetch_add(dropped, Ordering::Relaxed);
        for work in round {
            match work {
                Work::Score { prompt, top, reply } => {
                    self.stats.score_calls.fetch_add(1, Ordering::Relaxed);
                    let result = guarded(|| score_prompt(&self.model, &prompt, top, &self.device));
                    let _ = reply.send(result);
                }
                Work::Generate {
                    requests,
                    params,
                    answer,
                } => members.push((requests, answer, self.decoding(params))),
            }
        }
        if !members.is_empty() {
            self.generate_call(members, |room| self.admit(queue, jobs, room));
        }
    }

    /// Generate work that arrived while a generate call runs and can join it, whatever its
    /// decoding settings: at most `room` sequences, oldest first (work with more choices than
    /// `room` stays queued, and younger work that fits may pass it).
    fn admit(&self, queue: &mut VecDeque<Work>, jobs: &Receiver<Work>, room: usize) -> Vec<Member> {
        queue.extend(jobs.try_iter());
        let mut room = room;
        let mut admitted = Vec::new();
        let mut i = 0;
        while i < queue.len() && room > 0 {
            let joins = matches!(&queue[i], Work::Generate { requests, .. } if requests.len() <= room);
            if !joins {
                i += 1;
                continue;
            }
            if let Some(Work::Generate {
                requests,
                params,
                answer,
            }) = queue.remove(i)
            {
                if answer.closed() {
                    self.stats.cancelled.fetch_add(requests.len(), Ordering::Relaxed);
                    continue;
                }
                room -= requests.len();
                admitted.push((requests, answer, self.decoding(params)));
            }
        }
        admitted
    }

    /// One `generate` call for every member, and for the members `more(room)` adds while it
    /// runs, each row with its own decoding settings; each member gets its own slice of the
    /// results as soon as its last sequence finishes, or, streaming, each token as it comes.
    fn generate_call(&self, members: Vec<Member>, mut more: impl FnMut(usize) -> Vec<Member>) {
        self.stats.generate_calls.fetch_add(1, Ordering::Relaxed);
        let group = RefCell::new(Group::default());
        let enlist = |members: Vec<Member>| -> Vec<(Request, Decoding)> {
            let mut group = group.borrow_mut();
            let mut requests = Vec::new();
            for (rs, answer, decoding) in members {
                group.add(rs.len(), answer);
                requests.extend(rs.into_iter().map(|r| (r, decoding.clone())));
            }
            requests
        };
        let all = enlist(members);
        let result = guarded(|| {
            generate_admitting(
                &self.model,
                &self.tokenizer,
                all,
                BatchLimits {
                    batch_size: self.batching.batch_size,
                    kv_cache_tokens: self.batching.kv_cache_tokens,
                },
                &self.device,
                |room| enlist(more(room)),
                |event| group.borrow_mut().on_event(event, &self.stats),
            )
            .map_err(EngineError::from)
        });
        match result {
            Ok(stats) => {
                self.stats.sequences.fetch_add(stats.sequences, Ordering::Relaxed);
                self.stats
                    .new_tokens
                    .fetch_add(stats.new_tokens, Ordering::Relaxed);
                self.stats
                    .preemptions
                    .fetch_add(stats.preemptions, Ordering::Relaxed);
                if stats.preemptions > 0 {
                    // An operator sizing --kv-cache-gib wants to know what it costs.
                    eprintln!(
                        "note: {} rows set aside and prefilled again to stay within --kv-cache-gib ({} KV cache pages at most)",
                        stats.preemptions, stats.kv_pages_peak
                    );
                }
            }
            Err(e) => group.into_inner().fail(e),
        }
    }
}

/// The members of one generate call: request i belongs to member `owner[i]`, whose requests
/// are `starts[m]..starts[m] + sizes[m]`, `left[m]` of them unfinished.
#[derive(Default)]
struct Group {
    owner: Vec<usize>,
    starts: Vec<usize>,
    sizes: Vec<usize>,
    left: Vec<usize>,
    finished: Vec<Option<Generation>>,
    answers: Vec<Option<Answer>>,
}

impl Group {
    fn add(&mut self, requests: usize, answer: Answer) {
        let m = self.answers.len();
        self.starts.push(self.owner.len());
        self.owner.extend(std::iter::repeat_n(m, requests));
        self.sizes.push(requests);
        self.left.push(requests);
        self.finished.resize_with(self.owner.len(), || None);
        self.answers.push(Some(answer));
    }

    /// Passes a token or a finished generation to its member; false drops a row whose client
    /// went away.
    fn on_event(&mut self, event: Event<'_>, stats: &Stats) -> bool {
        match event {
            Event::Token {
                request: i,
                token,
                logprob,
            } => {
                let m = self.owner[i];
                let Some(answer) = &self.answers[m] else {
                    return false;
                };
                if let Answer::Stream(tx) = answer {
                    let _ = tx.send(Streamed::Token {
                        index: i - self.starts[m],
                        token,
                        logprob: logprob.cloned(),
                    });
                }
                // A client that went away frees its row at once.
                let go_on = !answer.closed();
                if !go_on {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                go_on
            }
            Event::Done {
                request: i,
                generation,
            } => {
                let m = self.owner[i];
                self.left[m] -= 1;
                match &self.answers[m] {
                    Some(Answer::Stream(tx)) => {
                        let _ = tx.send(Streamed::Done {
                            index: i - self.starts[m],
                            generation,
                        });
                    }
                    _ => self.finished[i] = Some(generation),
                }
                if self.left[m] == 0
                    && let Some(Answer::Whole(reply)) = self.answers[m].take()
                {
                    let (start, size) = (self.starts[m], self.sizes[m]);
                    let mine = self.finished[start..start + size]
                        .iter_mut()
                        .map(|g| g.take().expect("every sequence of the member finished"))
                        .collect();
                    let _ = reply.send(Ok(mine));
                }
                true
            }
        }
    }

    /// Every member still owed something hears the error.
    fn fail(self, e: EngineError) {
        for (answer, left) in self.answers.into_iter().zip(self.left) {
            if let Some(answer) = answer.filter(|_| left > 0) {
                answer.fail(e.clone());
            }
        }
    }
}

/// Batches of work one round may take (see [`Engine::run`]).
const ROUND_BATCHES: usize = 4;

/// The oldest work, up to `batch_size` sequences (at least one piece of work).
fn take_round(queue: &mut VecDeque<Work>, batch_size: usize) -> Vec<Work> {
    let mut round = Vec::new();
    let mut seqs = 0;
    while let Some(next) = queue.front() {
        if !round.is_empty() && seqs + next.sequences() > batch_size {
            break;
        }
        seqs += next.sequences();
        round.extend(queue.pop_front());
    }
    round
}

/// Runs model code so that a panic in it (a backend out of memory, say) becomes an error
/// for the requests at hand instead of ending the server. The model is only read, so a
/// panic leaves nothing half-changed.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = distill_core::panic_message(panic.as_ref()).unwrap_or("unknown panic");
        Err(EngineError(format!("the model failed: {msg}")))
    })
}

/// Teacher forcing over a prompt: for positions 1.., the log-probability and rank of the
/// prompt token given those before it, and the `top` most likely tokens there.
pub fn score_prompt<B: Kernels>(
    model: &CausalLm<B>,
    prompt: &[u32],
    top: usize,
    device: &B::Device,
) -> Result<Vec<PositionScore>, EngineError> {
    let t = prompt.len();
    if t < 2 {
        return Ok(Vec::new());
    }
    let ids = host::int_tensor::<B, 2>(prompt.iter().map(|&i| i64::from(i)).collect(), [1, t], device);
    let hidden = model.hidden_states(ids, None); // [1, T, C]
    let mut out = Vec::with_capacity(t - 1);
    for start in (0..t - 1).step_by(SCORE_CHUNK) {
        let c = SCORE_CHUNK.min(t - 1 - start);
        let logits = model
            .logits(hidden.clone().narrow(1, start, c))
            .squeeze_dim::<2>(0); // [c, V]
        let v = model.config.vocab_size.min(logits.dims()[1]);
        let logp = log_softmax(logits.narrow(1, 0, v).cast(DType::F32), 1); // [c, V]
        let labels = &prompt[start + 1..start + 1 + c];
        let label_ids =
            host::int_tensor::<B, 2>(labels.iter().map(|&i| i64::from(i)).collect(), [c, 1], device);
        let label_lp = logp.clone().gather(1, label_ids); // [c, 1]
        let above = logp
            .clone()
            .greater(label_lp.clone().expand([c, v]))
            .int()
            .sum_dim(1); // [c, 1]
        let label_lp = host::to_f32(label_lp)?;
        let above = host::to_u32(above)?;
        let (top_lp, top_ids) = if top > 0 {
            let (values, indices) = logp.topk_with_indices(top.min(v), 1); // [c, k]
            (host::to_f32(values)?, host::to_u32(indices)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let k = top.min(v);
        for (i, &token) in labels.iter().enumerate() {
            out.push(PositionScore {
                token,
                logprob: label_lp[i],
                rank: above[i] as usize + 1,
                top: (0..k).map(|j| (top_ids[i * k + j], top_lp[i * k + j])).collect(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_infer::generate::{Decoding, GenerationConfig};

    fn score(reply: Reply<Vec<PositionScore>>) -> Work {
        Work::Score {
            prompt: vec![1, 2],
            top: 0,
            reply,
        }
    }

    fn generate_work(n: usize, reply: Reply<Vec<Generation>>) -> Work {
        let answer = Answer::Whole(reply);
        Work::Generate {
            requests: vec![
                Request {
                    prompt: vec![1],
                    seed: 0
                };
                n
            ],
            params: Params {
                max_new_tokens: 1,
                sampling: Sampling::GREEDY,
                stop: vec![],
                logprobs: None,
                ignore_eos: false,
            },
            answer,
        }
    }

    #[test]
    fn a_round_takes_the_oldest_work_up_to_the_batch_size() {
        let mut queue = VecDeque::new();
        queue.push_back(generate_work(3, oneshot::channel().0));
        queue.push_back(generate_work(2, oneshot::channel().0));
        queue.push_back(score(oneshot::channel().0));
        let round = take_round(&mut queue, 4);
        assert_eq!(round.iter().map(Work::sequences).collect::<Vec<_>>(), [3]);
        let round = take_round(&mut queue, 4);
        assert_eq!(round.iter().map(Work::sequences).collect::<Vec<_>>(), [2, 1]);
        // Work larger than a batch still runs, alone (generate chunks it).
        queue.push_back(generate_work(9, oneshot::channel().0));
        queue.push_back(generate_work(1, oneshot::channel().0));
        assert_eq!(take_round(&mut queue, 4).len(), 1);
        assert_eq!(queue.len(), 1);
    }

    /// An engine over a tests/fixtures model on the CPU, `batch_size` rows, no batching window.
    fn test_engine(fixture: &str, batch_size: usize) -> (Engine<burn::backend::Flex>, Arc<TextTokenizer>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(fixture);
        let device = Default::default();
        let tokenizer = Arc::new(TextTokenizer::from_dir(&dir).unwrap());
        let engine = Engine {
            model: CausalLm::load(&dir, &device).unwrap(),
            tokenizer: tokenizer.clone(),
            eos: vec![],
            device,
            batching: Batching {
                batch_size,
                kv_cache_tokens: None,
                window: Duration::ZERO,
            },
            stats: Arc::new(Stats::default()),
        };
        (engine, tokenizer)
    }

    /// Members of one generate call (more sequences than the batch, so rows join mid-flight),
    /// each with its own decoding settings, each get exactly what their own requests decode
    /// alone, in their order.
    #[test]
    fn each_member_gets_its_own_generations() {
        let (engine, tokenizer) = test_engine("tiny-llama", 2);
        let decoding = |sampling: Sampling, logprobs: Option<usize>| Decoding {
            max_new_tokens: 4,
            sampling,
            stop: vec![],
            eos: vec![],
            logprobs,
        };
        let request = |text: &str, seed: u64| Request {
            prompt: tokenizer.encode(text, false).unwrap(),
            seed,
        };
        let asks: Vec<(Vec<Request>, Decoding)> = vec![
            (
                vec![request("One", 1)],
                decoding(
                    Sampling {
                        temperature: 1.0,
                        top_p: 1.0,
                        top_k: 0,
                    },
                    None,
                ),
            ),
            (
                vec![
                    request("Two prompts here", 2),
                    request("and", 3),
                    request("a third, longer one", 4),
                ],
                decoding(Sampling::GREEDY, Some(2)),
            ),
            (
                vec![request("Last", 5), request("member", 6)],
                decoding(
                    Sampling {
                        temperature: 0.8,
                        top_p: 0.9,
                        top_k: 0,
                    },
                    None,
                ),
            ),
        ];
        let (mut members, mut answers) = (Vec::new(), Vec::new());
        for (rs, d) in &asks {
            let (tx, rx) = oneshot::channel();
            members.push((rs.clone(), Answer::Whole(tx), d.clone()));
            answers.push(rx);
        }
        engine.generate_call(members, |_| Vec::new());
        for ((rs, d), mut rx) in asks.iter().zip(answers) {
            let got = rx.try_recv().expect("answered").expect("generated");
            let cfg = GenerationConfig {
                decoding: d.clone(),
                batch_size: 1,
                kv_cache_tokens: None,
            };
            let alone = distill_infer::generate::generate(
                &engine.model,
                &tokenizer,
                rs,
                &cfg,
                &engine.device,
                |_, _| {},
            )
            .unwrap()
            .0;
            let tokens = |g: &[Generation]| g.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>();
            assert_eq!(tokens(&got), tokens(&alone));
            assert!(got.iter().all(|g| g.logprobs.is_some() == d.logprobs.is_some()));
        }
        let stats = engine.stats.snapshot();
        assert_eq!((stats.generate_calls, stats.sequences), (1, 6));
    }

    /// A streaming member whose client is gone stops at its first token; the member beside
    /// it still gets its whole answer.
    #[test]
    fn a_client_that_went_away_frees_its_rows() {
        let (engine, tokenizer) = test_engine("tiny-qwen2", 4);
        let decoding = Decoding {
            max_new_tokens: 30,
            sampling: Sampling::GREEDY,
            stop: vec![],
            eos: vec![],
            logprobs: None,
        };
        let request = Request {
            prompt: tokenizer.encode("Once upon a time", false).unwrap(),
            seed: 0,
        };
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        drop(gone_rx);
        let (tx, mut rx) = oneshot::channel();
        let members = vec![
            (
                vec![request.clone(); 2],
                Answer::Stream(gone_tx),
                decoding.clone(),
            ),
            (vec![request], Answer::Whole(tx), decoding),
        ];
        engine.generate_call(members, |_| Vec::new());
        let kept = rx.try_recv().expect("answered").expect("generated");
        assert_eq!(kept[0].tokens.len(), 30);
        let stats = engine.stats.snapshot();
        assert_eq!(stats.cancelled, 2);
        assert_eq!(stats.new_tokens, 30 + 2, "one token each before the rows left");
    }

    #[test]
    fn work_whose_client_left_is_abandoned_and_panics_become_errors() {
        let (tx, rx) = oneshot::channel();
        let w = generate_work(1, tx);
        assert!(!w.abandoned());
        drop(rx);
        assert!(w.abandoned());
        let err = guarded::<()>(|| panic!("out of memory")).unwrap_err();
        assert_eq!(err.0, "the model failed: out of memory");
    }
}
