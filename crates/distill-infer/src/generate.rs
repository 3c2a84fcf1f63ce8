//! Batched, KV-cached generation: greedy or sampled (temperature, top-k, top-p), with EOS and
//! stop strings. `distill eval` scores its outputs; `distill serve` answers requests with it.
//!
//! Prompts of different lengths share a batch by left padding: padding is masked out of
//! attention and does not count as a position, so a row computes what it would alone.
//! Finished rows leave the batch (and the KV cache) at once. Each request has its own
//! [`Decoding`] (sampling, stop strings, EOS ids, logprobs, max_new_tokens) and samples from
//! its own seeded generator, so its output does not depend on which requests share its batch
//! or how they decode.
//!
//! Decoding runs a step ahead of the host: the tokens a step draws stay on the device as the
//! next step's input, which is queued before they reach the host (`Running::step`), so the
//! host's work between steps overlaps the GPU's. `DISTILL_DECODE_AHEAD=0` runs in step.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use distill_hf::tokenizer::TextTokenizer;
use distill_kernels::{PendingIds, RowSampling, SampledIds, sample};
use distill_models::PagedKv;
use distill_models::transformer::Context;
use distill_models::{CausalLm, Kernels};
use serde::{Deserialize, Serialize};

use crate::InferError;

/// How tokens are chosen. temperature 0 is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    /// 0 keeps every token.
    pub top_k: usize,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
    };
    /// DeepSeek's recommended settings for R1 and its distills.
    pub const R1: Sampling = Sampling {
        temperature: 0.6,
        top_p: 0.95,
        top_k: 0,
    };

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// What one [`generate`] call applies to every request; [`generate_admitting`] takes a
/// [`Decoding`] per request instead.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// How every request decodes.
    pub decoding: Decoding,
    /// Most sequences decoded together.
    pub batch_size: usize,
    /// Most positions the running rows' KV cache may hold ([`BatchLimits`]); None: no limit.
    pub kv_cache_tokens: Option<usize>,
}

impl GenerationConfig {
    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            batch_size: self.batch_size,
            kv_cache_tokens: self.kv_cache_tokens,
        }
    }
}

/// Positions of KV cache that `gib` GiB hold for `model` (in its activations' dtype): a
/// user's memory budget as [`BatchLimits::kv_cache_tokens`].
pub fn kv_cache_tokens_in_gib<B: Kernels>(model: &CausalLm<B>, gib: f64) -> usize {
    model.kv_cache_positions((gib * (1u64 << 30) as f64) as u64)
}

/// [`kv_cache_tokens_in_gib`] for a budget that must hold one sequence of `longest`
/// positions (so that every request fits alone): whole pages of it and a page of slack for a
/// row's partly filled first page. Err says how many positions the budget holds and needs.
pub fn kv_cache_tokens_holding<B: Kernels>(
    model: &CausalLm<B>,
    gib: f64,
    longest: usize,
) -> Result<usize, String> {
    let positions = kv_cache_tokens_in_gib(model, gib);
    let page = distill_models::paged::PAGE_LEN;
    let needed = longest.div_ceil(page) * page + page;
    if positions < needed {
        return Err(format!(
            "{gib} GiB holds {positions} positions, fewer than one sequence of {longest} needs ({needed})"
        ));
    }
    Ok(positions)
}

/// How much decodes together: rows, and the KV cache they hold.
///
/// Under a cache budget, requests join only while their prompts' pages fit beside the
/// running rows' (and a page for each row's next position). When the running rows outgrow
/// it, the rows that joined last leave the batch, their pages go back, and they wait at the
/// head of the queue; on rejoining, their prompt and the tokens drawn so far are prefilled
/// again and they go on with the same random stream (vLLM's preemption by recomputation), so
/// a request's tokens do not depend on the budget. A row that alone outgrows the whole budget
/// finishes there, as at `max_new_tokens`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    pub batch_size: usize,
    pub kv_cache_tokens: Option<usize>,
}

/// How one request decodes. Rows of one batch may each have their own: a row's tokens
/// depend only on its prompt, seed and these settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends before the first occurrence of any of these (not included in the text).
    pub stop: Vec<String>,
    /// Token ids that end generation (not included in the text).
    pub eos: Vec<u32>,
    /// Also return each new token's log-probability and this many alternatives (0: none),
    /// the model's own (temperature 1). A row that asks for them draws on the host.
    pub logprobs: Option<usize>,
}

/// A generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// (id, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One prompt to continue, and the seed of its own sampler.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// max_new_tokens reached.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens up to (not including) EOS; with a stop string, all tokens decoded so far.
    pub tokens: Vec<u32>,
    /// The decoded continuation, cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The EOS token that ended it (not in `tokens`): what a model trained on the sequence
    /// learns to stop with.
    pub eos: Option<u32>,
    /// Per new token (EOS excluded), when its [`Decoding::logprobs`] asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Throughput of one [`generate`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GenerationStats {
    pub sequences: usize,
    pub new_tokens: usize,
    /// Prompt positions the model ran (left padding included); samples of one prompt that
    /// join together share one prefill.
    pub prefill_tokens: usize,
    /// Rows that left the batch to make room in the KV cache, to be prefilled again
    /// ([`BatchLimits`]).
    pub preemptions: usize,
    /// Most KV cache pages the running rows held at once.
    pub kv_pages_peak: usize,
    pub seconds: f64,
}

impl GenerationStats {
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.new_tokens as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The ids that end generation for a model: its config's EOS ids and the tokenizer's EOS.
pub fn eos_ids<B: Kernels>(model: &CausalLm<B>, tokenizer: &TextTokenizer) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids.clone();
    let from_tokenizer = tokenizer
        .specials
        .eos
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t));
    ids.extend(from_tokenizer);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Continues every request; `on_done(i, &generation)` is called as request i finishes (for
/// progress bars). Results come back in request order.
///
/// Continuous batching: up to `batch_size` rows decode together, and as rows finish, waiting
/// requests join the running batch (prefilled on their own, then their KV cache is merged
/// in), so a batch does not idle until its longest row ends. A request's tokens depend only
/// on its prompt and seed, not on which rows it ran beside.
pub fn generate<B: Kernels>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    requests: &[Request],
    cfg: &GenerationConfig,
    device: &B::Device,
    mut on_done: impl FnMut(usize, &Generation),
) -> Result<(Vec<Generation>, GenerationStats), InferError> {
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    let stats = generate_with(model, tokenizer, requests, cfg, device, |event| {
        if let Event::Done { request, generation } = event {
            on_done(request, &generation);
            results[request] = Some(generation);
        }
        true
    })?;
    let generations = results
        .into_iter()
        .map(|g| g.expect("every request decoded"))
        .collect();
    Ok((generations, stats))
}

/// What [`generate_with`] reports as it decodes, in the order it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// Request `request` drew `token` (an EOS token never comes as one), with its
    /// log-probabilities when its [`Decoding::logprobs`] asked for them. The sink answers
    /// whether to go on: `false` drops the request at once (its row leaves the batch and it
    /// gets no `Done`), for a client that went away.
    Token {
        request: usize,
        token: u32,
        logprob: Option<&'a TokenLogprob>,
    },
    /// Request `request` finished (EOS, a stop string or `max_new_tokens`). The sink's answer
    /// is not read.
    Done { request: usize, generation: Generation },
}

/// [`generate`] for callers that follow each token (streaming) or may give up on a request:
/// `sink` sees every [`Event`]; results come only through it. `stats.sequences` counts the
/// requests that finished, `stats.new_tokens` every token drawn (EOS excluded), dropped
/// requests' included.
pub fn generate_with<B: Kernels>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    requests: &[Request],
    cfg: &GenerationConfig,
    device: &B::Device,
    sink: impl FnMut(Event<'_>) -> bool,
) -> Result<GenerationStats, InferError> {
    let all = requests
        .iter()
        .map(|r| (r.clone(), cfg.decoding.clone()))
        .collect();
    generate_admitting(model, tokenizer, all, cfg.limits(), device, |_| Vec::new(), sink)
}

/// [`generate_with`] for a caller whose requests decode in different ways or that takes more
/// work while it runs (a server): each request comes with its own [`Decoding`], and rows with
/// different settings share the batch. Before each step, `admit(room)` may return up to
/// `room` more requests; they are numbered after those already given and join at the next
/// step that has rows free. At most `limits.batch_size` rows decode together, within its KV
/// cache budget ([`BatchLimits`]).
pub fn generate_admitting<B: Kernels>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    mut requests: Vec<(Request, Decoding)>,
    limits: BatchLimits,
    device: &B::Device,
    mut admit: impl FnMut(usize) -> Vec<(Request, Decoding)>,
    mut sink: impl FnMut(Event<'_>) -> bool,
) -> Result<GenerationStats, InferError> {
    if let Some(i) = requests.iter().position(|(r, _)| r.prompt.is_empty()) {
        return Err(InferError::Invalid(format!("request {i} has an empty prompt")));
    }
    let started = Instant::now();
    let decoding = model.for_decoding();
    let model = &decoding;
    let mut stats = GenerationStats::default();
    let mut counted = |event: Event<'_>| {
        match &event {
            Event::Token { .. } => stats.new_tokens += 1,
            Event::Done { .. } => stats.sequences += 1,
        }
        sink(event)
    };
    // Similar lengths join together, so little compute goes to padding.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].0.prompt.len());
    let mut waiting: VecDeque<usize> = order.into();
    let batch_size = limits.batch_size.max(1);
    let mut running = Running::new(model, limits.kv_cache_tokens);
    let mut prefilled = 0;
    loop {
        let room = batch_size.saturating_sub(running.live.len() + waiting.len());
        if room > 0 {
            for (request, decoding) in admit(room) {
                if request.prompt.is_empty() {
                    let i = requests.len();
                    return Err(InferError::Invalid(format!("request {i} has an empty prompt")));
                }
                waiting.push_back(requests.len());
                requests.push((request, decoding));
            }
        }
        let free = batch_size - running.live.len();
        let rows = free.min(waiting.len());
        // Join when a quarter of the batch is free (or the rest fits): each join costs a
        // prefill. As many join as one prefill and the cache budget take.
        let quarter = (batch_size / 4).max(1);
        if rows > 0 && (running.live.is_empty() || rows >= quarter || rows == waiting.len()) {
            let join = running.joinable(&requests, waiting.range(..rows));
            if join > 0 {
                let joining: Vec<usize> = waiting.drain(..join).collect();
                prefilled += running.join(model, tokenizer, &requests, &joining, device, &mut counted)?;
                continue;
            }
        }
        if running.live.is_empty() {
            // Nothing running, and the first waiting request does not fit the cache alone.
            let Some(i) = waiting.pop_front() else {
                break;
            };
            running.outgrown(i, &requests, tokenizer, &mut counted)?;
            continue;
        }
        running.make_room(&requests, tokenizer, &mut waiting, &mut counted)?;
        if !running.live.is_empty() {
            running.step(model, tokenizer, device, &mut counted)?;
        }
    }
    stats.prefill_tokens = prefilled;
    stats.preemptions = running.preemptions;
    stats.kv_pages_peak = running.pages_peak;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Positions one join prefills at most (left padding included), unless a single prompt is
/// longer: a prefill's activations grow with its positions (each layer's MLP holds twice its
/// intermediate size a position), and the rest of the waiting rows join at the next step.
pub const MAX_PREFILL_TOKENS: usize = 16 * 1024;

/// Where rows report to: answers whether a row goes on after a token.
type Sink<'s> = dyn FnMut(Event<'_>) -> bool + 's;

/// A sequence still being decoded. Its last token is the next step's input; the cache holds
/// everything before it.
struct Live {
    request: usize,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    rng: fastrand::Rng,
    /// Left padding of this row in the cache.
    pad: usize,
    /// Its request's settings.
    decoding: Decoding,
}

impl Live {
    fn new(request: usize, (r, decoding): &(Request, Decoding), pad: usize) -> Self {
        Live {
            request,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            rng: fastrand::Rng::with_seed(r.seed),
            pad,
            decoding: decoding.clone(),
        }
    }
}

/// The rows decoding together and their KV cache, left-padded to one length.
struct Running<B: Kernels> {
    live: Vec<Live>,
    cache: PagedKv<B>,
    /// Each live row's next token, drawn on the device at the last step and on its way to the
    /// host: the next step's input ([`Running::step`] runs a step ahead of the host).
    ahead: Option<SampledIds<B>>,
    /// Rows that left to make room in the cache, by request, waiting to be prefilled again.
    resumed: HashMap<usize, Live>,
    preemptions: usize,
    pages_peak: usize,
}

impl<B: Kernels> Running<B> {
    fn new(model: &CausalLm<B>, kv_cache_tokens: Option<usize>) -> Self {
        let mut cache = model.new_paged_cache();
        let page_len = cache.page_len();
        cache.set_page_limit(kv_cache_tokens.map(|t| t / page_len));
        Running {
            live: Vec::new(),
            cache,
            ahead: None,
            resumed: HashMap::new(),
            preemptions: 0,
            pages_peak: 0,
        }
    }

    /// What request `i` prefills when it joins: its prompt, and the tokens it drew before it
    /// left to make room.
    fn sequence(&self, i: usize, requests: &[(Request, Decoding)]) -> Vec<u32> {
        let drawn = self.resumed.get(&i).map_or(&[][..], |l| &l.tokens);
        [requests[i].0.prompt.as_slice(), drawn].concat()
    }

    /// How many of `waiting` (in order) may join now: as many as one prefill of at most
    /// [`MAX_PREFILL_TOKENS`] takes (at least one), and within the cache budget: their
    /// pages, each new row's page for its first step, and the running rows' for their next.
    fn joinable<'w>(
        &self,
        requests: &[(Request, Decoding)],
        waiting: impl Iterator<Item = &'w usize>,
    ) -> usize {
        let mut waiting = waiting.map(|&i| self.sequence(i, requests));
        let Some(first) = waiting.next() else {
            return 0;
        };
        // Pages left once the running rows have their next ones.
        let free = self
            .cache
            .pages_free()
            .map(|f| f.saturating_sub(self.cache.reserve_cost(1)));
        let pl = self.cache.page_len();
        // A step under a budget with no room asks again: the first alone is the cheap answer
        // (a prompt is never empty, so it takes at least a page).
        if free.is_some_and(|free| first.len().div_ceil(pl) > free) {
            return 0;
        }
        let seqs: Vec<Vec<u32>> = std::iter::once(first).chain(waiting).collect();
        let fits = |k: usize| {
            let seqs = &seqs[..k];
            let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
            let (distinct, sources) = distinct_sequences(seqs);
            if k > 1 && distinct.len() * width > MAX_PREFILL_TOKENS {
                return false;
            }
            free.is_none_or(|free| {
                let pads: Vec<usize> = distinct.iter().map(|&r| width - seqs[r].len()).collect();
                let first_step = if width % pl == 0 { k } else { 0 };
                self.cache.admit_cost(width, &sources, &pads) + first_step <= free
            })
        };
        // Both grow with k: the most that fit, by bisection.
        let (mut lo, mut hi) = (0, seqs.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Request `i` does not fit the cache budget with no row running: a new request is an
    /// error; one that left to make room ends where it is (as at `max_new_tokens`).
    fn outgrown(
        &mut self,
        i: usize,
        requests: &[(Request, Decoding)],
        tokenizer: &TextTokenizer,
        sink: &mut Sink<'_>,
    ) -> Result<(), InferError> {
        let Some(mut l) = self.resumed.remove(&i) else {
            let n = requests[i].0.prompt.len();
            let budget = self.cache.pages_free().unwrap_or(0) * self.cache.page_len();
            return Err(InferError::Invalid(format!(
                "request {i}: its prompt of {n} tokens does not fit the KV cache budget of {budget} positions"
            )));
        };
        let generation = finish(tokenizer, &mut l, FinishReason::Length, None)?;
        sink(Event::Done {
            request: i,
            generation,
        });
        Ok(())
    }

    /// Before a step: while the rows' next positions do not fit the cache budget, the row
    /// that joined last leaves for the head of `waiting` ([`BatchLimits`]); a row alone that
    /// does not fit ends ([`Running::outgrown`]).
    fn make_room(
        &mut self,
        requests: &[(Request, Decoding)],
        tokenizer: &TextTokenizer,
        waiting: &mut VecDeque<usize>,
        sink: &mut Sink<'_>,
    ) -> Result<(), InferError> {
        let fits = |c: &PagedKv<B>| c.pages_free().is_none_or(|f| c.reserve_cost(1) <= f);
        if fits(&self.cache) {
            return Ok(());
        }
        // The tokens in flight come in first: rows that end at them make room too.
        self.settle(tokenizer, sink)?;
        while !fits(&self.cache) {
            let Some(l) = self.live.pop() else {
                break;
            };
            let i = l.request;
            self.resumed.insert(i, l);
            if self.live.is_empty() {
                self.cache.clear();
                self.outgrown(i, requests, tokenizer, sink)?;
            } else {
                self.preemptions += 1;
                waiting.push_front(i);
                self.drop_cache_rows(&(0..self.live.len()).collect::<Vec<_>>());
            }
        }
        Ok(())
    }

    /// Prefills `joining` (left-padded among themselves), takes each one's first token, and
    /// adds the rows still going to the running batch's pages, the shorter side padded on
    /// the left (which moves no keys: [`PagedKv::admit`]).
    fn join(
        &mut self,
        model: &CausalLm<B>,
        tokenizer: &TextTokenizer,
        requests: &[(Request, Decoding)],
        joining: &[usize],
        device: &B::Device,
        sink: &mut Sink<'_>,
    ) -> Result<usize, InferError> {
        // The batch is about to change: the tokens in flight come in first.
        self.settle(tokenizer, sink)?;
        // Requests that may not draw a token finish at once.
        let (joining, empty): (Vec<usize>, Vec<usize>) =
            joining.iter().partition(|&&i| requests[i].1.max_new_tokens > 0);
        for i in empty {
            let mut l = Live::new(i, &requests[i], 0);
            let generation = finish(tokenizer, &mut l, FinishReason::Length, None)?;
            sink(Event::Done {
                request: i,
                generation,
            });
        }
        if joining.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<Vec<u32>> = joining.iter().map(|&i| self.sequence(i, requests)).collect();
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut rows: Vec<Live> = joining
            .iter()
            .zip(&seqs)
            .map(|(&i, seq)| match self.resumed.remove(&i) {
                Some(l) => Live {
                    pad: width - seq.len(),
                    ..l
                },
                None => Live::new(i, &requests[i], width - seq.len()),
            })
            .collect();
        // Samples of one prompt (eval's n per problem, serve's `n`, on-policy's samples per
        // prompt) share its prefill: each distinct prompt runs once, its last logits are
        // copied to every sample of it, and the samples share its pages.
        let (distinct, copy_of) = distinct_sequences(&seqs);
        let ids: Vec<u32> = distinct
            .iter()
            .flat_map(|&r| std::iter::repeat_n(0, rows[r].pad).chain(seqs[r].iter().copied()))
            .collect();
        let mut cache = model.new_cache();
        let pads: Vec<usize> = distinct.iter().map(|&r| rows[r].pad).collect();
        let ctx = Context::left_padded(&model.rotary, &pads, width, 0, device);
        let hidden = model.hidden_states_with(
            ids_tensor::<B>(&ids, distinct.len(), width, device),
            &ctx,
            Some(&mut cache),
        ); // [u, width, C]
        let mut logits = model.logits(hidden.narrow(1, width - 1, 1)).squeeze_dim::<2>(1); // [u, V]
        if distinct.len() < rows.len() {
            logits = rows_of(logits, &copy_of); // [n, V]
        }
        let prefilled = distinct.len() * width;
        let next = next_tokens(logits, &mut rows, tokenizer.vocab_size())?;
        let keep = advance(tokenizer, &mut rows, next, sink)?;
        if keep.is_empty() {
            return Ok(prefilled);
        }
        // The prefill row each row still going reads.
        let sources: Vec<usize> = keep.iter().map(|&r| copy_of[r]).collect();
        retain_rows(&mut rows, &keep);
        // The shorter side is padded on the left to the longer one's length.
        if !self.live.is_empty() {
            let (ours, theirs) = (self.cache.len(), width);
            if ours < theirs {
                self.live.iter_mut().for_each(|l| l.pad += theirs - ours);
            } else {
                rows.iter_mut().for_each(|l| l.pad += ours - theirs);
            }
        }
        self.cache.admit(&cache, &sources, &pads);
        self.pages_peak = self.pages_peak.max(self.cache.pages_in_use());
        self.live.extend(rows);
        Ok(prefilled)
    }

    /// One decoding step for every running row; finished rows leave the batch.
    ///
    /// With the rows' tokens still on their way from the device (`ahead`), the step goes out
    /// first and the host takes those tokens in while the GPU runs it: the host's work
    /// between steps (the step's inputs, reporting tokens, stop strings) no longer leaves the
    /// GPU idle. A row that ends at those tokens was computed one step too far; its result is
    /// dropped. Where every row ends at them (`max_new_tokens`), no step goes out.
    fn step(
        &mut self,
        model: &CausalLm<B>,
        tokenizer: &TextTokenizer,
        device: &B::Device,
        sink: &mut Sink<'_>,
    ) -> Result<(), InferError> {
        let pads: Vec<usize> = self.live.iter().map(|l| l.pad).collect();
        let Some(ahead) = self.ahead.take() else {
            let last: Vec<u32> = self
                .live
                .iter()
                .map(|l| *l.tokens.last().expect("a running row has a token"))
                .collect();
            let logits = model.decode_step(&last, &pads, &mut self.cache, device); // [b, V]
            return self.sample(logits, tokenizer, sink);
        };
        let last_of_all = self
            .live
            .iter()
            .all(|l| l.tokens.len() + 1 >= l.decoding.max_new_tokens);
        let logits = (!last_of_all).then(|| model.decode_step_ids(ahead.ids, &pads, &mut self.cache, device));
        let keep = self.take_drawn(ahead.read, tokenizer, sink)?;
        match logits {
            Some(logits) if !keep.is_empty() => self.sample(rows_of(logits, &keep), tokenizer, sink),
            _ => Ok(()),
        }
    }

    /// Each live row's next token from `logits` [b, V]: drawn on the device and left in
    /// flight (`ahead`) where every row may be, else drawn and taken in now (a row that
    /// wants logprobs draws on the host).
    fn sample(
        &mut self,
        logits: Tensor<B, 2>,
        tokenizer: &TextTokenizer,
        sink: &mut Sink<'_>,
    ) -> Result<(), InferError> {
        if run_ahead() && self.live.iter().all(|l| l.decoding.logprobs.is_none()) {
            let rows: Vec<RowSampling> = self
                .live
                .iter_mut()
                .map(|l| row_sampling(&l.decoding.sampling, &mut l.rng))
                .collect();
            let vocab = tokenizer.vocab_size().min(logits.dims()[1]);
            self.ahead = Some(B::sample_rows_ahead(logits, vocab, &rows).map_err(InferError::Invalid)?);
            return Ok(());
        }
        let next = next_tokens(logits, &mut self.live, tokenizer.vocab_size())?;
        self.take(next, tokenizer, sink).map(|_| ())
    }

    /// Takes in the tokens still in flight, if any: before the batch changes (a join).
    fn settle(&mut self, tokenizer: &TextTokenizer, sink: &mut Sink<'_>) -> Result<(), InferError> {
        if let Some(ahead) = self.ahead.take() {
            self.take_drawn(ahead.read, tokenizer, sink)?;
        }
        Ok(())
    }

    /// [`Running::take`] of the tokens in flight, once they reach the host.
    fn take_drawn(
        &mut self,
        read: PendingIds,
        tokenizer: &TextTokenizer,
        sink: &mut Sink<'_>,
    ) -> Result<Vec<usize>, InferError> {
        let drawn = read.wait().map_err(InferError::Invalid)?;
        self.take(drawn.into_iter().map(|t| (t, None)).collect(), tokenizer, sink)
    }

    /// Appends each live row's token ([`advance`]); finished rows leave the batch and the
    /// cache. Returns the indices of the rows still going.
    fn take(
        &mut self,
        next: Vec<(u32, Option<TokenLogprob>)>,
        tokenizer: &TextTokenizer,
        sink: &mut Sink<'_>,
    ) -> Result<Vec<usize>, InferError> {
        self.pages_peak = self.pages_peak.max(self.cache.pages_in_use());
        let keep = advance(tokenizer, &mut self.live, next, sink)?;
        if keep.len() < self.live.len() {
            retain_rows(&mut self.live, &keep);
            self.drop_cache_rows(&keep);
        }
        Ok(keep)
    }

    /// The cache keeps the rows `keep` that `live` kept, and drops the padding all of them
    /// share (dead weight).
    fn drop_cache_rows(&mut self, keep: &[usize]) {
        if self.live.is_empty() {
            self.cache.clear();
            return;
        }
        self.cache.select_rows(keep);
        let common = self.live.iter().map(|l| l.pad).min().unwrap_or(0);
        if common > 0 {
            self.cache.trim_front(common);
            self.live.iter_mut().for_each(|l| l.pad -= common);
        }
    }
}

static AHEAD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0); // 0: not read yet, 1 on, 2 off

/// Whether decoding runs a step ahead of the host ([`Running::step`]):
/// `DISTILL_DECODE_AHEAD=0` turns it off, as does [`set_run_ahead`].
fn run_ahead() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match AHEAD.load(Relaxed) {
        0 => {
            let on = std::env::var("DISTILL_DECODE_AHEAD").map_or(true, |v| v != "0");
            let _ = AHEAD.compare_exchange(0, if on { 1 } else { 2 }, Relaxed, Relaxed);
            run_ahead()
        }
        code => code == 1,
    }
}

/// Runs every later generation's decoding a step ahead of the host (true) or in step with
/// it: to compare the two.
pub fn set_run_ahead(on: bool) {
    AHEAD.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Appends each row's new token and reports it, or finishes the row (one of its EOS ids, one
/// of its stop strings, or its `max_new_tokens` reached), or drops it (the sink said stop).
/// Returns the indices of the rows still going.
fn advance(
    tokenizer: &TextTokenizer,
    live: &mut [Live],
    next: Vec<(u32, Option<TokenLogprob>)>,
    sink: &mut Sink<'_>,
) -> Result<Vec<usize>, InferError> {
    let mut keep = Vec::with_capacity(live.len());
    for (row, (l, (tok, lp))) in live.iter_mut().zip(next).enumerate() {
        let request = l.request;
        if l.decoding.eos.contains(&tok) {
            let generation = finish(tokenizer, l, FinishReason::Stop, Some(tok))?;
            sink(Event::Done { request, generation });
            continue;
        }
        l.tokens.push(tok);
        let go_on = sink(Event::Token {
            request,
            token: tok,
            logprob: lp.as_ref(),
        });
        l.logprobs.extend(lp);
        if !go_on {
            continue;
        }
        let reason = if completes_stop(tokenizer, &l.tokens, &l.decoding.stop)? {
            Some(FinishReason::Stop)
        } else if l.tokens.len() >= l.decoding.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                let generation = finish(tokenizer, l, reason, None)?;
                sink(Event::Done { request, generation });
            }
            None => keep.push(row),
        }
    }
    Ok(keep)
}

/// Whether the text of `tokens` holds one of `stop`, checked once per token as they come: a
/// stop string first found at this token ends within its text, so only the last tokens are
/// decoded, as many as the longest stop string has bytes (a token decodes to at least one
/// byte) and two more (a window's first token may decode differently alone: a cut UTF-8
/// sequence, SentencePiece's leading space). Decoding the whole text at every token made a
/// generation's host work quadratic in its length.
fn completes_stop(tokenizer: &TextTokenizer, tokens: &[u32], stop: &[String]) -> Result<bool, InferError> {
    let Some(longest) = stop.iter().map(String::len).max() else {
        return Ok(false);
    };
    let from = tokens.len().saturating_sub(longest + 2);
    let text = tokenizer.decode(&tokens[from..], true)?;
    Ok(stop.iter().any(|s| text.contains(s.as_str())))
}

/// Of the joining rows' sequences: the position of the first of each distinct sequence, and
/// for every row the index of its sequence among those.
fn distinct_sequences(seqs: &[Vec<u32>]) -> (Vec<usize>, Vec<usize>) {
    let mut first: HashMap<&[u32], usize> = HashMap::new();
    let mut distinct = Vec::new();
    let copy_of = seqs
        .iter()
        .enumerate()
        .map(|(r, seq)| {
            *first.entry(seq.as_slice()).or_insert_with(|| {
                distinct.push(r);
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, copy_of)
}

/// Keeps the rows at the (increasing) indices `keep`.
fn retain_rows(live: &mut Vec<Live>, keep: &[usize]) {
    let mut rows = keep.iter().peekable();
    let mut i = 0;
    live.retain(|_| {
        let k = rows.peek() == Some(&&i);
        if k {
            rows.next();
        }
        i += 1;
        k
    });
}

fn ids_tensor<B: Kernels>(ids: &[u32], rows: usize, cols: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

fn finish(
    tokenizer: &TextTokenizer,
    live: &mut Live,
    reason: FinishReason,
    eos: Option<u32>,
) -> Result<Generation, InferError> {
    let tokens = std::mem::take(&mut live.tokens);
    let mut text = tokenizer.decode(&tokens, true)?;
    if let Some(cut) = live
        .decoding
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        text.truncate(cut);
    }
    let logprobs = std::mem::take(&mut live.logprobs);
    Ok(Generation {
        tokens,
        text,
        finish_reason: reason,
        eos,
        logprobs: live.decoding.logprobs.map(|_| logprobs),
    })
}

/// The next token of every live row, with its log-probabilities when its row asks for them.
/// logits: [b, V]; `vocab`: the tokenizer's size, past which embedding rows are padding
/// (Qwen2.5-7B has 152,064 rows for 151,665 tokens) that are never picked.
///
/// Each row draws with one uniform number from its own generator, under its own settings, by
/// [`distill_kernels::sample`]'s rule. Rows without log-probabilities draw together through
/// [`Kernels::sample_rows`] (on CUDA on the device, greedy rows too; only the ids cross to the
/// host). Rows with log-probabilities need their whole row of logits on the host: only those
/// rows are copied, and they draw there.
fn next_tokens<B: Kernels>(
    logits: Tensor<B, 2>,
    live: &mut [Live],
    vocab: usize,
) -> Result<Vec<(u32, Option<TokenLogprob>)>, InferError> {
    let [b, v] = logits.dims();
    debug_assert_eq!(live.len(), b);
    let v_real = vocab.min(v);
    let rows: Vec<RowSampling> = live
        .iter_mut()
        .map(|l| row_sampling(&l.decoding.sampling, &mut l.rng))
        .collect();
    let (on_host, on_device): (Vec<usize>, Vec<usize>) =
        (0..b).partition(|&i| live[i].decoding.logprobs.is_some());
    let mut next: Vec<(u32, Option<TokenLogprob>)> = vec![(0, None); b];
    if !on_device.is_empty() {
        let settings: Vec<RowSampling> = on_device.iter().map(|&i| rows[i]).collect();
        // Greedy rows too (temperature 0 is the kernel's argmax, first maximum as torch's):
        // one pass over each row's candidate columns, read in place, and one path for all rows.
        let ids = B::sample_rows(rows_of(logits.clone(), &on_device), v_real, &settings)
            .map_err(InferError::Invalid)?;
        for (&i, t) in on_device.iter().zip(ids) {
            next[i].0 = t;
        }
    }
    if !on_host.is_empty() {
        let host =
            sample::candidates_on_host(rows_of(logits, &on_host), v_real).map_err(InferError::Invalid)?; // [h, V]
        use rayon::prelude::*;
        let drawn: Vec<(u32, Option<TokenLogprob>)> = host
            .par_chunks(v_real)
            .zip(on_host.par_iter())
            .map(|(row, &i)| {
                let tok = sample::sample_row(row, &rows[i]);
                let k = live[i].decoding.logprobs.unwrap_or(0);
                (tok, Some(token_logprob(row, tok, k)))
            })
            .collect();
        for (&i, d) in on_host.iter().zip(drawn) {
            next[i] = d;
        }
    }
    Ok(next)
}

/// The rows `idx` of `logits` [b, V], repeats allowed: [idx.len(), V]; every row in order
/// without a copy.
fn rows_of<B: Kernels>(logits: Tensor<B, 2>, idx: &[usize]) -> Tensor<B, 2> {
    if idx.iter().copied().eq(0..logits.dims()[0]) {
        return logits;
    }
    let device = logits.device();
    let ids: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [idx.len()]), &device);
    logits.select(0, ids)
}

/// How a row draws its next token under `s`: one uniform from its generator each step, drawn
/// whether or not the row samples, so a row's stream of draws is its own.
fn row_sampling(s: &Sampling, rng: &mut fastrand::Rng) -> RowSampling {
    RowSampling {
        temperature: s.temperature as f32,
        top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
        top_p: s.top_p as f32,
        uniform: rng.f32(),
    }
}

/// log-softmax of `row` at `token`, and its top `k` entries.
pub fn token_logprob(row: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + row.iter().map(|&z| (z - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(row.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        top.extend(idx.into_iter().map(|i| (i, row[i as usize] - log_z)));
    }
    TokenLogprob {
        token,
        logprob: row[token as usize] - log_z,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The tiny-llama fixture's model and tokenizer, on the CPU.
    fn tiny_llama() -> (CausalLm<Flex>, TextTokenizer, burn::tensor::Device<Flex>) {
        let dir = fixture("tiny-llama");
        let device = Default::default();
        let model = CausalLm::<Flex>::load(&dir, &device).unwrap();
        (model, TextTokenizer::from_dir(&dir).unwrap(), device)
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::env::var_os("DISTILL_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
            })
            .join(name)
    }

    #[test]
    fn stop_strings_are_found_at_the_token_that_completes_them_as_in_the_whole_text() {
        let tokenizer = TextTokenizer::from_dir(&fixture("tiny-qwen2")).unwrap();
        let text = "Let me think. 答案是 42.\n\nSo the answer is </answer> done, 答案 again\n\n";
        let tokens = tokenizer.encode(text, false).unwrap();
        let stops = [
            vec!["</answer>".to_string()],
            vec!["\n\n".to_string()],
            vec!["答案".to_string(), "So".to_string()],
            vec!["42.".to_string()],
            vec!["not in it".to_string()],
        ];
        for stop in &stops {
            // The first prefix whose whole text holds a stop string, by the definition.
            let whole = (1..=tokens.len()).find(|&n| {
                let t = tokenizer.decode(&tokens[..n], true).unwrap();
                stop.iter().any(|s| t.contains(s.as_str()))
            });
            let windowed =
                (1..=tokens.len()).find(|&n| completes_stop(&tokenizer, &tokens[..n], stop).unwrap());
            assert_eq!(windowed, whole, "{stop:?}");
            assert_eq!(whole.is_some(), stop[0] != "not in it", "{stop:?}");
        }
        assert!(!completes_stop(&tokenizer, &tokens, &[]).unwrap());
    }

    /// Greedy decoding one token at a time over the full sequence, no cache, no batch: the
    /// plain definition (the forward it runs matches transformers, see distill-models).
    fn reference_greedy(model: &CausalLm<Flex>, prompt: &[u32], steps: usize) -> Vec<u32> {
        let mut ids = prompt.to_vec();
        for _ in 0..steps {
            let x = ids_tensor::<Flex>(&ids, 1, ids.len(), &Default::default());
            let logits = model.forward(x); // [1, T, V]
            let t = ids.len();
            let last = logits.narrow(1, t - 1, 1).narrow(2, 0, model.config.vocab_size);
            ids.push(last.argmax(2).into_data().iter::<i64>().next().unwrap() as u32);
        }
        ids[prompt.len()..].to_vec()
    }

    #[test]
    fn batched_left_padded_decoding_equals_one_at_a_time() {
        let dir = fixture("tiny-qwen2");
        let device = Default::default();
        let model = CausalLm::<Flex>::load(&dir, &device).unwrap();
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        let prompts: Vec<Vec<u32>> = [
            "Hi",
            "What is 12 times 7? Think step by step.",
            "A longer prompt, with commas, and more words in it.",
        ]
        .iter()
        .map(|t| tokenizer.encode(t, false).unwrap())
        .collect();
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                seed: 0,
            })
            .collect();
        let cfg = GenerationConfig {
            decoding: Decoding {
                max_new_tokens: 12,
                sampling: Sampling::GREEDY,
                stop: vec![],
                eos: vec![],
                logprobs: None,
            },
            batch_size: 3,
            kv_cache_tokens: None,
        };
        let (batched, stats) = generate(&model, &tokenizer, &requests, &cfg, &device, |_, _| {}).unwrap();
        assert_eq!(stats.new_tokens, 36);
        for (p, g) in prompts.iter().zip(&batched) {
            assert_eq!(g.tokens, reference_greedy(&model, p, 12), "prompt {p:?}");
            assert_eq!(g.finish_reason, FinishReason::Length);
        }
    }

    /// Embedding rows past the tokenizer's vocabulary (padding, as Qwen2.5 has) are never
    /// sampled: a random model over 384 + 64 rows would pick them about 1 time in 7.
    #[test]
    fn padding_rows_past_the_tokenizer_are_never_sampled() {
        let dir = fixture("tiny-qwen2");
        let device = Default::default();
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        let mut config = CausalLm::<Flex>::load(&dir, &device).unwrap().config;
        config.vocab_size = tokenizer.vocab_size() + 64;
        let model = CausalLm::<Flex>::init(&config, &device);
        let prompt = tokenizer.encode("What is 2 + 3?", false).unwrap();
        let requests: Vec<Request> = (0..16)
            .map(|seed| Request {
                prompt: prompt.clone(),
                seed,
            })
            .collect();
        for sampling in [
            Sampling::GREEDY,
            Sampling {
                temperature: 1.5,
                top_p: 1.0,
                top_k: 0,
            },
        ] {
            let cfg = GenerationConfig {
                decoding: Decoding {
                    max_new_tokens: 16,
                    sampling,
                    stop: vec![],
                    eos: vec![],
                    logprobs: None,
                },
                batch_size: 8,
                kv_cache_tokens: None,
            };
            let (out, _) = generate(&model, &tokenizer, &requests, &cfg, &device, |_, _| {}).unwrap();
            let picked: Vec<u32> = out.iter().flat_map(|g| g.tokens.iter().copied()).collect();
            assert_eq!(picked.len(), 16 * 16);
            assert!(
                picked.iter().all(|&t| (t as usize) < tokenizer.vocab_size()),
                "{:?}",
                picked
                    .iter()
                    .filter(|&&t| t as usize >= tokenizer.vocab_size())
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Decoding a step ahead of the host (the default) against in step with it, over a
    /// mixed load: rows ending at EOS tokens of several depths, at a stop string and at
    /// `max_new_tokens`, one wanting logprobs (which puts the batch back in step while it
    /// runs), one dropped by the sink, and joins mid-flight at batch 3. Each request's
    /// events, in order, must be the same (across requests they may interleave otherwise: a
    /// join waits for the step in flight).
    #[test]
    fn running_a_step_ahead_of_the_host_changes_no_event() {
        let (model, tokenizer, device) = tiny_llama();
        let texts = [
            "Hi",
            "Once upon a time",
            "What is 12 times 7?",
            "Short one",
            "Numbers: 1, 2, 3",
            "x",
            "yes",
        ];
        let sampled = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
        };
        let requests: Vec<(Request, Decoding)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let request = Request {
                    prompt: tokenizer.encode(t, false).unwrap(),
                    seed: 7 + i as u64,
                };
                let decoding = Decoding {
                    max_new_tokens: 6 + 3 * i,
                    sampling: if i % 2 == 0 {
                        sampled.clone()
                    } else {
                        Sampling::GREEDY
                    },
                    stop: if i == 3 { vec!["e".into()] } else { vec![] },
                    eos: vec![],
                    logprobs: (i == 4).then_some(2),
                };
                (request, decoding)
            })
            .collect();
        let run = |ahead: bool, requests: Vec<(Request, Decoding)>| {
            set_run_ahead(ahead);
            let mut events = vec![Vec::new(); texts.len()];
            let stats = generate_admitting(
                &model,
                &tokenizer,
                requests,
                BatchLimits {
                    batch_size: 3,
                    kv_cache_tokens: None,
                },
                &device,
                |_| Vec::new(),
                |e| match &e {
                    Event::Token { request, token, .. } => {
                        events[*request].push(format!("drew {token}"));
                        // The client of request 5 goes away after its third token.
                        !(*request == 5 && events[5].len() == 3)
                    }
                    Event::Done { request, generation } => {
                        let (tokens, reason) = (&generation.tokens, generation.finish_reason);
                        events[*request].push(format!("done: {tokens:?} {reason:?}"));
                        true
                    }
                },
            )
            .unwrap();
            set_run_ahead(true);
            (events, stats.new_tokens)
        };
        let (in_step, _) = run(false, requests.clone());
        // EOS tokens from the in-step run at different depths, so rows end early.
        let drawn = |r: usize| -> Vec<u32> {
            in_step[r]
                .iter()
                .filter_map(|e| e.strip_prefix("drew ").map(|t| t.parse().unwrap()))
                .collect()
        };
        let mut requests = requests;
        for (r, depth) in [(0, 2), (2, 4), (6, 1)] {
            if let Some(&t) = drawn(r).get(depth) {
                requests[r].1.eos.push(t);
            }
        }
        let (in_step, n0) = run(false, requests.clone());
        let (ahead, n1) = run(true, requests);
        assert_eq!(ahead, in_step);
        assert_eq!(n1, n0);
        let done = in_step.iter().flatten().filter(|e| e.starts_with("done")).count();
        assert_eq!(
            done,
            texts.len() - 1,
            "every request but the dropped one finishes: {in_step:?}"
        );
        assert_eq!(in_step[5].len(), 3, "the dropped request: {:?}", in_step[5]);
    }

    /// Rows that end early make room, waiting requests join the running batch mid-flight with
    /// caches of other lengths, and every request still draws what it draws alone.
    #[test]
    fn continuous_batching_joins_rows_mid_flight_and_changes_no_output() {
        let (model, tokenizer, device) = tiny_llama();
        let texts = [
            "Hi",
            "Once upon a time",
            "What is 12 times 7? Think step by step.",
            "A longer prompt, with commas, and more words in it than the others.",
            "Short one",
            "Numbers: 1, 2, 3, 4",
            "x",
        ];
        let requests: Vec<Request> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Request {
                prompt: tokenizer.encode(t, false).unwrap(),
                seed: 100 + i as u64,
            })
            .collect();
        let steps = 12;
        let cfg = |batch_size: usize, eos: Vec<u32>| GenerationConfig {
            decoding: Decoding {
                max_new_tokens: steps,
                sampling: Sampling {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 0,
                },
                stop: vec![],
                eos,
                logprobs: None,
            },
            batch_size,
            kv_cache_tokens: None,
        };
        // Each request alone, without EOS: its sample stream.
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| {
                generate(
                    &model,
                    &tokenizer,
                    std::slice::from_ref(r),
                    &cfg(1, vec![]),
                    &device,
                    |_, _| {},
                )
                .unwrap()
                .0[0]
                    .tokens
                    .clone()
            })
            .collect();
        // EOS tokens taken from the streams at different depths, so rows end at different steps.
        let eos: Vec<u32> = (0..3).map(|i| alone[i][2 + 3 * i]).collect();
        let expected: Vec<Vec<u32>> = alone
            .iter()
            .map(|g| g.iter().take_while(|t| !eos.contains(t)).copied().collect())
            .collect();
        let mut lengths: Vec<usize> = expected.iter().map(Vec::len).collect();
        lengths.sort();
        lengths.dedup();
        assert!(
            lengths.len() >= 3,
            "rows should end at several depths: {expected:?}"
        );
        for batch_size in [2, 3, 8] {
            let mut finished = Vec::new();
            let (out, stats) = generate(
                &model,
                &tokenizer,
                &requests,
                &cfg(batch_size, eos.clone()),
                &device,
                |i, _| finished.push(i),
            )
            .unwrap();
            for (i, g) in out.iter().enumerate() {
                assert_eq!(g.tokens, expected[i], "batch {batch_size}, prompt {:?}", texts[i]);
                let reason = if expected[i].len() < steps {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                };
                assert_eq!(
                    g.finish_reason, reason,
                    "batch {batch_size}, prompt {:?}",
                    texts[i]
                );
            }
            finished.sort();
            assert_eq!(
                finished,
                (0..texts.len()).collect::<Vec<_>>(),
                "each request reported once"
            );
            assert_eq!(stats.new_tokens, expected.iter().map(Vec::len).sum::<usize>());
        }
    }

    /// Under a KV cache budget smaller than the batch needs, rows that joined last are set
    /// aside as the cache fills and recomputed later: every request still draws exactly what
    /// it draws alone (samples of one prompt included), and the cache never holds more pages
    /// than the budget. A row that alone outgrows the budget ends there; a prompt that does
    /// not fit alone is refused by name.
    #[test]
    fn a_kv_cache_budget_sets_rows_aside_and_changes_no_output() {
        let (model, tokenizer, device) = tiny_llama();
        let vocab = tokenizer.vocab_size() as u32;
        let prompt = |len: usize, salt: u32| -> Vec<u32> {
            (0..len as u32)
                .map(|j| (j * 7 + salt) % (vocab - 3) + 3)
                .collect()
        };
        let mut requests: Vec<Request> = [(50, 1), (58, 2), (61, 3), (70, 4)]
            .iter()
            .enumerate()
            .map(|(i, &(len, salt))| Request {
                prompt: prompt(len, salt),
                seed: 7 + i as u64,
            })
            .collect();
        // A second sample of the first prompt.
        requests.push(Request {
            prompt: requests[0].prompt.clone(),
            seed: 99,
        });
        let cfg =
            |batch_size: usize, kv_cache_tokens: Option<usize>, max_new_tokens: usize| GenerationConfig {
                decoding: Decoding {
                    max_new_tokens,
                    sampling: Sampling {
                        temperature: 1.0,
                        top_p: 1.0,
                        top_k: 0,
                    },
                    stop: vec![],
                    eos: vec![],
                    logprobs: None,
                },
                batch_size,
                kv_cache_tokens,
            };
        let run = |requests: &[Request], cfg: &GenerationConfig| {
            generate(&model, &tokenizer, requests, cfg, &device, |_, _| {})
        };
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| {
                run(std::slice::from_ref(r), &cfg(1, None, 40)).unwrap().0[0]
                    .tokens
                    .clone()
            })
            .collect();
        // Five rows of up to 110 positions want ten pages of 64 or more; the budget is six.
        let budget = 6 * distill_models::paged::PAGE_LEN;
        let (out, stats) = run(&requests, &cfg(5, Some(budget), 40)).unwrap();
        for (i, g) in out.iter().enumerate() {
            assert_eq!(g.tokens, alone[i], "request {i}");
            assert_eq!(g.finish_reason, FinishReason::Length);
        }
        assert!(
            stats.preemptions > 0,
            "the budget should set rows aside: {stats:?}"
        );
        assert!(stats.kv_pages_peak <= 6, "{stats:?}");
        let (_, unlimited) = run(&requests, &cfg(5, None, 40)).unwrap();
        assert_eq!(unlimited.preemptions, 0);
        assert!(unlimited.kv_pages_peak > 6, "{unlimited:?}");

        // Alone in two pages, a 100-token prompt has room for 28 more positions: 29 tokens.
        let long = [Request {
            prompt: prompt(100, 5),
            seed: 3,
        }];
        let (out, _) = run(&long, &cfg(1, Some(2 * distill_models::paged::PAGE_LEN), 60)).unwrap();
        let (want, _) = run(&long, &cfg(1, None, 29)).unwrap();
        assert_eq!(out[0].tokens, want[0].tokens);
        assert_eq!(out[0].finish_reason, FinishReason::Length);

        requests.push(Request {
            prompt: prompt(7 * distill_models::paged::PAGE_LEN, 6),
            seed: 0,
        });
        let err = run(&requests, &cfg(5, Some(budget), 40)).unwrap_err().to_string();
        assert!(
            err.contains("request 5: its prompt of 448 tokens does not fit the KV cache budget"),
            "{err}"
        );
    }

    /// One join prefills at most MAX_PREFILL_TOKENS positions (padding included), or one
    /// prompt however long; samples of one prompt count once.
    #[test]
    fn a_join_prefills_at_most_max_prefill_tokens() {
        let (model, _, _) = tiny_llama();
        let running = Running::new(&model, None);
        let request = |len: usize, salt: u32| {
            let prompt = (0..len as u32).map(|j| (j + salt) % 100 + 3).collect();
            let decoding = Decoding {
                max_new_tokens: 1,
                sampling: Sampling::GREEDY,
                stop: vec![],
                eos: vec![],
                logprobs: None,
            };
            (Request { prompt, seed: 0 }, decoding)
        };
        let third = MAX_PREFILL_TOKENS / 3;
        let requests = vec![
            request(third, 1),
            request(third - 5, 2),
            request(third, 1),
            request(third + 1, 3),
            request(MAX_PREFILL_TOKENS + 1, 4),
        ];
        let joinable = |ids: &[usize]| running.joinable(&requests, ids.iter());
        // Requests 0 and 2 are samples of one prompt: two distinct rows of `third` to prefill.
        assert_eq!(joinable(&[0, 1, 2]), 3, "the sample of prompt 0 adds nothing");
        assert_eq!(joinable(&[0, 1, 3]), 2, "three rows padded to third + 1 are over");
        assert_eq!(joinable(&[4, 0]), 1, "a prompt over the cap prefills alone");
        assert_eq!(joinable(&[]), 0);
    }

    /// The events of generate_with: each request's tokens one by one, then its generation;
    /// a request the sink gives up on leaves without one, and the others are unchanged.
    #[test]
    fn events_follow_each_token_and_a_dropped_request_leaves_the_rest_unchanged() {
        let dir = fixture("tiny-qwen2");
        let device = Default::default();
        let model = CausalLm::<Flex>::load(&dir, &device).unwrap();
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        let requests: Vec<Request> = ["Hi", "Once upon a time", "Numbers: 1, 2, 3"]
            .iter()
            .map(|t| Request {
                prompt: tokenizer.encode(t, false).unwrap(),
                seed: 0,
            })
            .collect();
        let cfg = GenerationConfig {
            decoding: Decoding {
                max_new_tokens: 10,
                sampling: Sampling::GREEDY,
                stop: vec![],
                eos: vec![],
                logprobs: Some(1),
            },
            batch_size: 2,
            kv_cache_tokens: None,
        };
        let (want, _) = generate(&model, &tokenizer, &requests, &cfg, &device, |_, _| {}).unwrap();
        let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut done: Vec<Option<Generation>> = vec![None; 3];
        let stats = generate_with(
            &model,
            &tokenizer,
            &requests,
            &cfg,
            &device,
            |event| match event {
                Event::Token {
                    request,
                    token,
                    logprob,
                } => {
                    assert_eq!(logprob.map(|l| l.token), Some(token));
                    assert!(done[request].is_none(), "a token after Done");
                    seen[request].push(token);
                    // Request 1 is dropped at its fourth token.
                    !(request == 1 && seen[1].len() == 4)
                }
                Event::Done { request, generation } => {
                    done[request] = Some(generation);
                    true
                }
            },
        )
        .unwrap();
        for i in [0, 2] {
            assert_eq!(done[i].as_ref(), Some(&want[i]));
            assert_eq!(seen[i], want[i].tokens);
        }
        assert!(done[1].is_none());
        assert_eq!(seen[1], want[1].tokens[..4]);
        assert_eq!((stats.sequences, stats.new_tokens), (2, 10 + 4 + 10));
    }

    /// Rows with their own settings share one call (a greedy row, a sampled one, one with a
    /// stop string, one with log-probabilities, one with its own EOS id that joins through
    /// `admit`), rows joining mid-flight at small batch sizes, and each row gets exactly what
    /// it gets alone in its own call: tokens, text, finish reason, EOS, log-probabilities.
    #[test]
    fn rows_with_their_own_settings_decode_as_they_do_alone() {
        let (model, tokenizer, device) = tiny_llama();
        let request = |text: &str, seed: u64| Request {
            prompt: tokenizer.encode(text, false).unwrap(),
            seed,
        };
        let alone = |r: &Request, d: &Decoding| -> Generation {
            let cfg = GenerationConfig {
                decoding: d.clone(),
                batch_size: 1,
                kv_cache_tokens: None,
            };
            let (mut out, _) = generate(
                &model,
                &tokenizer,
                std::slice::from_ref(r),
                &cfg,
                &device,
                |_, _| {},
            )
            .unwrap();
            out.remove(0)
        };
        let plain = |max_new_tokens: usize, sampling: Sampling| Decoding {
            max_new_tokens,
            sampling,
            stop: vec![],
            eos: vec![],
            logprobs: None,
        };
        let mut rows: Vec<(Request, Decoding)> = vec![
            (request("Hi", 1), plain(10, Sampling::GREEDY)),
            (
                request("Once upon a time", 2),
                plain(
                    12,
                    Sampling {
                        temperature: 0.8,
                        top_p: 0.9,
                        top_k: 0,
                    },
                ),
            ),
            (
                request("Numbers: 1, 2, 3", 3),
                plain(
                    14,
                    Sampling {
                        temperature: 1.0,
                        top_p: 1.0,
                        top_k: 20,
                    },
                ),
            ),
            (
                request("What is 12 times 7? Think step by step.", 4),
                Decoding {
                    logprobs: Some(3),
                    ..plain(
                        9,
                        Sampling {
                            temperature: 1.0,
                            top_p: 0.95,
                            top_k: 50,
                        },
                    )
                },
            ),
            (
                request("A longer prompt, with commas, and more words.", 5),
                plain(11, Sampling::GREEDY),
            ),
        ];
        // Row 2's stop string: two characters from the middle of what it writes without one.
        let text = alone(&rows[2].0, &rows[2].1).text;
        let chars: Vec<char> = text.chars().collect();
        assert!(
            chars.len() >= 4,
            "sampled text too short for a stop string: {text:?}"
        );
        rows[2].1.stop = vec![chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect()];
        // Row 4's EOS: its own fourth token.
        rows[4].1.eos = vec![alone(&rows[4].0, &rows[4].1).tokens[3]];
        let want: Vec<Generation> = rows.iter().map(|(r, d)| alone(r, d)).collect();
        assert_eq!(want[2].finish_reason, FinishReason::Stop, "{:?}", want[2]);
        assert_eq!(want[4].finish_reason, FinishReason::Stop, "{:?}", want[4]);
        assert!(want[3].logprobs.as_ref().is_some_and(|l| l.len() == 9));
        // The settings really differ between rows: all greedy, row 1 would decode otherwise.
        assert_ne!(alone(&rows[1].0, &rows[0].1).tokens, want[1].tokens);

        for batch_size in [2, 3, 5] {
            let mut got: Vec<Option<Generation>> = vec![None; rows.len()];
            let mut late = Some(rows[4].clone());
            generate_admitting(
                &model,
                &tokenizer,
                rows[..4].to_vec(),
                BatchLimits {
                    batch_size,
                    kv_cache_tokens: None,
                },
                &device,
                |_| late.take().into_iter().collect(),
                |event| {
                    if let Event::Done { request, generation } = event {
                        got[request] = Some(generation);
                    }
                    true
                },
            )
            .unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let g = g.as_ref().unwrap_or_else(|| panic!("row {i} not finished"));
                let at = format!("batch {batch_size}, row {i}");
                assert_eq!(g.tokens, w.tokens, "{at}");
                assert_eq!(g.text, w.text, "{at}");
                assert_eq!((g.finish_reason, g.eos), (w.finish_reason, w.eos), "{at}");
                assert_eq!(g.logprobs.is_some(), w.logprobs.is_some(), "{at}");
                for (a, b) in g.logprobs.iter().flatten().zip(w.logprobs.iter().flatten()) {
                    assert_eq!(a.token, b.token, "{at}");
                    assert!((a.logprob - b.logprob).abs() < 1e-4, "{at}: {a:?} {b:?}");
                    let ids = |t: &TokenLogprob| t.top.iter().map(|&(id, _)| id).collect::<Vec<_>>();
                    assert_eq!(ids(a), ids(b), "{at}");
                    for (x, y) in a.top.iter().zip(&b.top) {
                        assert!((x.1 - y.1).abs() < 1e-4, "{at}: {a:?} {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn eos_and_stop_strings_end_rows_and_sampling_ignores_batch_company() {
        let dir = fixture("tiny-qwen2");
        let device = Default::default();
        let model = CausalLm::<Flex>::load(&dir, &device).unwrap();
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        let prompt = tokenizer.encode("Once upon a time", false).unwrap();
        let greedy = reference_greedy(&model, &prompt, 6);
        // The 3rd greedy token as EOS: the row stops before it.
        let cfg = GenerationConfig {
            decoding: Decoding {
                max_new_tokens: 6,
                sampling: Sampling::GREEDY,
                stop: vec![],
                eos: vec![greedy[2]],
                logprobs: None,
            },
            batch_size: 4,
            kv_cache_tokens: None,
        };
        let req = Request {
            prompt: prompt.clone(),
            seed: 0,
        };
        let (out, _) = generate(
            &model,
            &tokenizer,
            std::slice::from_ref(&req),
            &cfg,
            &device,
            |_, _| {},
        )
        .unwrap();
        let first = greedy.iter().position(|&t| t == greedy[2]).unwrap();
        assert_eq!(out[0].tokens, greedy[..first]);
        assert_eq!(out[0].finish_reason, FinishReason::Stop);

        // Sampling: a request's output depends on its seed, not on the other rows.
        let cfg = GenerationConfig {
            decoding: Decoding {
                max_new_tokens: 8,
                sampling: Sampling {
                    temperature: 1.0,
                    top_p: 0.9,
                    top_k: 50,
                },
                stop: vec![],
                eos: vec![],
                logprobs: Some(3),
            },
            batch_size: 4,
            kv_cache_tokens: None,
        };
        let alone = Request {
            prompt: prompt.clone(),
            seed: 11,
        };
        let others: Vec<Request> = (0..3)
            .map(|i| Request {
                prompt: tokenizer
                    .encode(&format!("Other prompt {i}, longer"), false)
                    .unwrap(),
                seed: i,
            })
            .collect();
        let (solo, _) = generate(
            &model,
            &tokenizer,
            std::slice::from_ref(&alone),
            &cfg,
            &device,
            |_, _| {},
        )
        .unwrap();
        let mut mixed = others.clone();
        mixed.insert(1, alone);
        let (together, _) = generate(&model, &tokenizer, &mixed, &cfg, &device, |_, _| {}).unwrap();
        assert_eq!(solo[0].tokens, together[1].tokens);

        // Log-probabilities are the model's own at each new token: teacher forcing agrees.
        let lps = solo[0].logprobs.as_ref().unwrap();
        assert_eq!(lps.len(), solo[0].tokens.len());
        let full: Vec<u32> = prompt.iter().chain(&solo[0].tokens).copied().collect();
        let v = model.config.vocab_size;
        let logits = model
            .forward(ids_tensor::<Flex>(&full, 1, full.len(), &device))
            .narrow(2, 0, v);
        let logp: Vec<f32> = burn::tensor::activation::log_softmax(logits, 2)
            .into_data()
            .into_vec()
            .unwrap();
        for (i, lp) in lps.iter().enumerate() {
            let at = (prompt.len() - 1 + i) * v;
            assert!(
                (lp.logprob - logp[at + lp.token as usize]).abs() < 1e-4,
                "token {i}"
            );
            assert_eq!(lp.top.len(), 3);
            assert!(lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
            let best = logp[at..at + v].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!((lp.top[0].1 - best).abs() < 1e-4);
        }

        // A stop string cuts the text before it.
        let text = tokenizer.decode(&solo[0].tokens, true).unwrap();
        let chars: Vec<char> = text.chars().collect();
        assert!(
            chars.len() >= 4,
            "sampled text too short for the stop test: {text:?}"
        );
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let cfg = GenerationConfig {
            decoding: Decoding {
                stop: vec![stop.clone()],
                ..cfg.decoding
            },
            ..cfg
        };
        let (cut, _) = generate(&model, &tokenizer, &mixed[1..2], &cfg, &device, |_, _| {}).unwrap();
        assert_eq!(cut[0].finish_reason, FinishReason::Stop);
        assert_eq!(cut[0].text, text[..text.find(&stop).unwrap()]);
    }

    /// Samples of one prompt share its prefill (the prompt runs once, its cache rows are
    /// copied), and each sample still draws what it draws alone.
    #[test]
    fn samples_of_one_prompt_share_its_prefill_and_draw_what_they_draw_alone() {
        let (model, tokenizer, device) = tiny_llama();
        let prompts = [
            "Once upon a time",
            "What is 12 times 7?",
            "Once upon a time",
            "x",
            "Once upon a time",
            "x",
        ];
        let requests: Vec<Request> = prompts
            .iter()
            .enumerate()
            .map(|(i, t)| Request {
                prompt: tokenizer.encode(t, false).unwrap(),
                seed: 7 + i as u64,
            })
            .collect();
        let cfg = |batch_size| GenerationConfig {
            decoding: Decoding {
                max_new_tokens: 10,
                sampling: Sampling {
                    temperature: 1.0,
                    top_p: 0.95,
                    top_k: 0,
                },
                stop: vec![],
                eos: vec![],
                logprobs: None,
            },
            batch_size,
            kv_cache_tokens: None,
        };
        let (together, stats) = generate(&model, &tokenizer, &requests, &cfg(8), &device, |_, _| {}).unwrap();
        let width = requests.iter().map(|r| r.prompt.len()).max().unwrap();
        assert_eq!(
            stats.prefill_tokens,
            3 * width,
            "three distinct prompts, one prefill each"
        );
        for (r, g) in requests.iter().zip(&together) {
            let (alone, _) = generate(
                &model,
                &tokenizer,
                std::slice::from_ref(r),
                &cfg(1),
                &device,
                |_, _| {},
            )
            .unwrap();
            assert_eq!(g.tokens, alone[0].tokens, "seed {}", r.seed);
        }
        // The copies are samples, not one sample copied: the three of the first prompt differ.
        assert!(
            together[0].tokens != together[2].tokens || together[2].tokens != together[4].tokens,
            "{:?}",
            [&together[0].tokens, &together[2].tokens, &together[4].tokens]
        );
    }
}
