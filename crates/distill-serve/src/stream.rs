//! Streaming: the engine's tokens in, OpenAI's server-sent events out.
//!
//! Per choice, text passes three stages before it is sent:
//! 1. [`TextStream`] decodes tokens incrementally and holds back an incomplete UTF-8
//!    character, and any tail that could be the start of a stop string;
//! 2. for chat, [`ThinkSplit`] routes the text to `reasoning_content` or `content`, as the
//!    non-streaming answer splits it (both trimmed);
//! 3. [`Chunker`] wraps it in `chat.completion.chunk` / `text_completion` objects.
//!
//! When a choice finishes, the engine's final text (cut before any stop string) settles what
//! was held back, so the concatenated deltas equal the non-streaming answer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{Generation, TokenLogprob};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, ChatLogprobs, Usage};
use crate::engine::{EngineError, Streamed};
use crate::tokens::Vocab;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Incremental detokenization with stop strings held back.
///
/// Tokens are decoded in a sliding window (vLLM's `detokenize_incrementally`): the text of
/// `tokens[prefix..]` minus that of `tokens[prefix..read]`, which keeps the decoder's context
/// (a SentencePiece leading space) without decoding the whole sequence each token. A window
/// whose text ends in U+FFFD ends inside a character and waits for the next token.
#[derive(Debug, Default)]
pub struct TextStream {
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
    /// Decoded text of whole characters.
    text: String,
    /// `text[..released]` has been passed on: it holds no stop string, and no stop string
    /// can start inside it.
    released: usize,
    stop: Vec<String>,
    /// A stop string appeared: nothing more is released.
    stopped: bool,
}

impl TextStream {
    pub fn new(stop: Vec<String>) -> TextStream {
        TextStream {
            stop,
            ..TextStream::default()
        }
    }

    /// Adds a token; returns the text that may be sent now (often empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> String {
        self.tokens.push(token);
        if self.stopped {
            return String::new();
        }
        let before = tokenizer
            .decode(&self.tokens[self.prefix..self.read], true)
            .unwrap_or_default();
        let after = tokenizer
            .decode(&self.tokens[self.prefix..], true)
            .unwrap_or_default();
        if after.len() <= before.len() || after.ends_with('\u{fffd}') || !after.starts_with(&before) {
            return String::new();
        }
        self.text.push_str(&after[before.len()..]);
        self.prefix = self.read;
        self.read = self.tokens.len();
        self.release()
    }

    /// Releases what no stop string can claim; cuts at a stop string.
    fn release(&mut self) -> String {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let end = if longest == 0 {
            self.text.len()
        } else {
            // A stop string starts at or after `released`: search from there, and from up to
            // `longest - 1` bytes before for safety at character boundaries.
            let mut from = self.released.saturating_sub(longest - 1);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let window = &self.text[from..];
            match self.stop.iter().filter_map(|s| window.find(s.as_str())).min() {
                Some(at) => {
                    self.stopped = true;
                    (from + at).max(self.released)
                }
                None => self.text.len() - self.held_back(),
            }
        };
        let out = self.text[self.released..end].to_string();
        self.released = end;
        out
    }

    /// The longest unreleased tail of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.released..];
        self.stop
            .iter()
            .map(|s| {
                (1..s.len().min(tail.len() + 1))
                    .rev()
                    .find(|&k| {
                        tail.is_char_boundary(tail.len() - k)
                            && s.as_bytes().starts_with(&tail.as_bytes()[tail.len() - k..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    /// The choice finished with `text` (the engine's, cut before any stop string): returns
    /// what of it was not sent yet.
    pub fn finish(&mut self, text: &str) -> String {
        let sent = &self.text[..self.released];
        self.stopped = true;
        let rest = match text.strip_prefix(sent) {
            Some(rest) => rest,
            // Decoding a prefix gave other text than decoding the whole (a tokenizer's
            // clean-up rules): what was sent stays sent; what follows its length goes.
            None => text.get(sent.len()..).unwrap_or(""),
        };
        self.released = self.text.len();
        rest.to_string()
    }
}

/// Which part of a chat answer text goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the output opens with `<think>`.
    Start,
    /// Inside `<think>`: `reasoning_content`, trimmed.
    Reasoning,
    /// After `</think>`: `content`, trimmed.
    Answer,
    /// A model that does not think: `content`, as generated.
    Plain,
}

/// The pieces of one step of a chat choice's text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

/// Splits a chat choice's streamed text into reasoning and answer, as
/// [`api::assistant_message`] splits the whole text: when the prompt opened `<think>` or the
/// output starts with it, everything up to `</think>` is reasoning and the rest the answer,
/// each trimmed (leading whitespace dropped, trailing whitespace held until more text comes);
/// otherwise the text is content, untouched.
///
/// One difference from the whole-text split: a `</think>` that comes in text already sent as
/// content (the model thinks without the prompt or its own output opening `<think>`) stays
/// in the content.
#[derive(Debug)]
pub struct ThinkSplit {
    phase: Phase,
    prompt_opens_think: bool,
    /// Text of the current phase not sent yet.
    held: String,
    /// The current phase has sent something (so leading whitespace is no longer dropped).
    begun: bool,
}

impl ThinkSplit {
    pub fn new(prompt_opens_think: bool) -> ThinkSplit {
        ThinkSplit {
            phase: Phase::Start,
            prompt_opens_think,
            held: String::new(),
            begun: false,
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        self.feed(text, &mut out);
        out
    }

    fn feed(&mut self, text: &str, out: &mut Split) {
        self.held.push_str(text);
        match self.phase {
            Phase::Start => {
                let t = self.held.trim_start();
                if t.len() < THINK_OPEN.len() && THINK_OPEN.starts_with(t) {
                    return; // might still become `<think>`
                }
                let rest = if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                    self.phase = Phase::Reasoning;
                    rest.to_string()
                } else {
                    self.phase = if self.prompt_opens_think {
                        Phase::Reasoning
                    } else {
                        Phase::Plain
                    };
                    std::mem::take(&mut self.held)
                };
                self.held.clear();
                self.feed(&rest, out);
            }
            Phase::Reasoning => {
                self.trim_start();
                if let Some(at) = self.held.find(THINK_CLOSE) {
                    out.reasoning.push_str(self.held[..at].trim_end());
                    let rest = self.held[at + THINK_CLOSE.len()..].to_string();
                    self.phase = Phase::Answer;
                    self.held.clear();
                    self.begun = false;
                    self.feed(&rest, out);
                    return;
                }
                // Hold a tail that could start `</think>`, and the whitespace before it.
                let partial = (1..THINK_CLOSE.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&k| self.held.ends_with(&THINK_CLOSE[..k]))
                    .unwrap_or(0);
                let end = self.held[..self.held.len() - partial].trim_end().len();
                self.send(end, |o| &mut o.reasoning, out);
            }
            Phase::Answer => {
                self.trim_start();
                let end = self.held.trim_end().len();
                self.send(end, |o| &mut o.content, out);
            }
            Phase::Plain => {
                out.content.push_str(&self.held);
                self.held.clear();
            }
        }
    }

    fn trim_start(&mut self) {
        if !self.begun {
            let dropped = self.held.len() - self.held.trim_start().len();
            self.held.drain(..dropped);
        }
    }

    fn send(&mut self, end: usize, part: impl Fn(&mut Split) -> &mut String, out: &mut Split) {
        if end > 0 {
            part(out).push_str(&self.held[..end]);
            self.held.drain(..end);
            self.begun = true;
        }
    }

    /// The choice ended: what was held and belongs to the answer (trailing whitespace does
    /// not).
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        if self.phase == Phase::Start {
            self.phase = if self.prompt_opens_think {
                Phase::Reasoning
            } else {
                Phase::Plain
            };
            let held = std::mem::take(&mut self.held);
            self.feed(&held, &mut out);
        }
        let held = std::mem::take(&mut self.held);
        match self.phase {
            // Unclosed: the reasoning runs to the end, trailing whitespace trimmed.
            Phase::Reasoning if self.begun => out.reasoning.push_str(held.trim_end()),
            Phase::Reasoning => out.reasoning.push_str(held.trim()),
            Phase::Plain => out.content.push_str(&held),
            Phase::Answer | Phase::Start => {}
        }
        out
    }
}

/// One streamed choice.
struct Choice {
    text: TextStream,
    /// Chat only.
    think: Option<ThinkSplit>,
    /// Log-probabilities of tokens whose text has not been sent yet.
    logprobs: Vec<TokenLogprob>,
    done: bool,
}

/// Which endpoint the chunks are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `chat.completion.chunk` with `delta`s; `prompt_opens_think` as for the whole answer.
    Chat { prompt_opens_think: bool },
    /// `text_completion` chunks with `text`.
    Text,
}

/// What a streamed request needs to know of itself.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    pub kind: Kind,
    /// `chatcmpl-...` / `cmpl-...`
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    pub stop: Vec<String>,
    pub prompt_tokens: usize,
    /// `stream_options.include_usage`: `usage: null` on every chunk, then a last chunk with
    /// the usage and no choices.
    pub include_usage: bool,
    /// Chat `logprobs: true`: each chunk carries its tokens' log-probabilities.
    pub logprobs: bool,
}

#[derive(Serialize)]
struct Chunk<C> {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<C>,
    /// Absent unless usage was asked for; then null but on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChatChunkChoice {
    index: usize,
    delta: Delta,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
}

#[derive(Serialize)]
struct TextChunkChoice {
    index: usize,
    text: String,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// Turns engine events into SSE lines for one request.
pub struct Chunker {
    plan: StreamPlan,
    choices: Vec<Choice>,
    completion_tokens: usize,
}

impl Chunker {
    pub fn new(plan: StreamPlan) -> Chunker {
        let choices = (0..plan.n)
            .map(|_| Choice {
                text: TextStream::new(plan.stop.clone()),
                think: match plan.kind {
                    Kind::Chat { prompt_opens_think } => Some(ThinkSplit::new(prompt_opens_think)),
                    Kind::Text => None,
                },
                logprobs: Vec::new(),
                done: false,
            })
            .collect();
        Chunker {
            plan,
            choices,
            completion_tokens: 0,
        }
    }

    /// Every choice has finished.
    pub fn finished(&self) -> bool {
        self.choices.iter().all(|c| c.done)
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.plan.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.plan.prompt_tokens + self.completion_tokens,
        }
    }

    /// The first chunks, sent before any token: chat announces the assistant role per choice.
    pub fn start(&self, out: &mut String) {
        if let Kind::Chat { .. } = self.plan.kind {
            for index in 0..self.plan.n {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    reasoning_content: None,
                };
                self.chat_chunk(index, delta, None, None, out);
            }
        }
    }

    pub fn on(&mut self, event: Streamed, tokenizer: &TextTokenizer, vocab: &Vocab, out: &mut String) {
        match event {
            Streamed::Token {
                index,
                token,
                logprob,
            } => {
                let Some(choice) = self.choices.get_mut(index) else {
                    return;
                };
                let piece = choice.text.push(tokenizer, token);
                choice.logprobs.extend(logprob);
                self.emit(index, piece, None, vocab, out);
            }
            Streamed::Done { index, generation } => self.done(index, &generation, vocab, out),
            Streamed::Failed(e) => self.fail(&e, out),
        }
    }

    fn done(&mut self, index: usize, g: &Generation, vocab: &Vocab, out: &mut String) {
        let Some(choice) = self.choices.get_mut(index) else {
            return;
        };
        if choice.done {
            return;
        }
        choice.done = true;
        self.completion_tokens += g.tokens.len();
        let rest = choice.text.finish(&g.text);
        self.emit(index, rest, Some(api::finish_reason(g.finish_reason)), vocab, out);
    }

    /// Sends `piece` of choice `index`'s text (split for chat); with `finish`, also what its
    /// splitter held, and the finish reason on the last chunk. Log-probabilities of the
    /// tokens so far ride on the first chunk sent.
    fn emit(
        &mut self,
        index: usize,
        piece: String,
        finish: Option<&'static str>,
        vocab: &Vocab,
        out: &mut String,
    ) {
        let choice = &mut self.choices[index];
        let Some(think) = &mut choice.think else {
            if !piece.is_empty() || finish.is_some() {
                self.text_chunk(index, piece, finish, out);
            }
            return;
        };
        let mut split = think.push(&piece);
        if finish.is_some() {
            let end = think.finish();
            split.reasoning.push_str(&end.reasoning);
            split.content.push_str(&end.content);
        }
        let mut deltas = Vec::new();
        if !split.reasoning.is_empty() {
            deltas.push(Delta {
                reasoning_content: Some(split.reasoning),
                ..Delta::default()
            });
        }
        if !split.content.is_empty() {
            deltas.push(Delta {
                content: Some(split.content),
                ..Delta::default()
            });
        }
        if deltas.is_empty() && finish.is_some() {
            deltas.push(Delta::default());
        }
        let mut logprobs = (!deltas.is_empty() && self.plan.logprobs && !choice.logprobs.is_empty())
            .then(|| api::chat_logprobs(vocab, &std::mem::take(&mut choice.logprobs)));
        let last = deltas.len().saturating_sub(1);
        for (i, delta) in deltas.into_iter().enumerate() {
            let f = finish.filter(|_| i == last);
            self.chat_chunk(index, delta, logprobs.take(), f, out);
        }
    }

    fn chat_chunk(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
        out: &mut String,
    ) {
        let choice = ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        };
        self.line(vec![choice], None, out);
    }

    fn text_chunk(&self, index: usize, text: String, finish_reason: Option<&'static str>, out: &mut String) {
        let choice = TextChunkChoice {
            index,
            text,
            logprobs: None,
            finish_reason,
        };
        self.line(vec![choice], None, out);
    }

    fn line<C: Serialize>(&self, choices: Vec<C>, usage: Option<Usage>, out: &mut String) {
        let object = match self.plan.kind {
            Kind::Chat { .. } => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let chunk = Chunk {
            id: self.plan.id.clone(),
            object,
            created: self.plan.created,
            model: self.plan.model.clone(),
            choices,
            usage: self.plan.include_usage.then_some(usage),
        };
        data_line(&serde_json::to_string(&chunk).expect("chunks serialize"), out);
    }

    /// After the last choice: the usage chunk when asked for, then `[DONE]`.
    pub fn end(&self, out: &mut String) {
        if self.plan.include_usage {
            self.line(Vec::<TextChunkChoice>::new(), Some(self.usage()), out);
        }
        data_line("[DONE]", out);
    }

    /// The model failed mid-stream: an OpenAI error object (the SDKs raise it), then `[DONE]`.
    pub fn fail(&mut self, e: &EngineError, out: &mut String) {
        let body = serde_json::json!({"error": {
            "message": e.0, "type": "server_error", "param": null, "code": null,
        }});
        data_line(&body.to_string(), out);
        self.choices.iter_mut().for_each(|c| c.done = true);
    }
}

fn data_line(data: &str, out: &mut String) {
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
}

/// The response body of a streamed request: SSE lines as the engine's events arrive.
/// Dropping it (the client went away) drops the receiver, which the engine notices.
pub struct SseBody {
    events: UnboundedReceiver<Streamed>,
    chunker: Chunker,
    tokenizer: Arc<TextTokenizer>,
    vocab: Arc<Vocab>,
    ready: VecDeque<Bytes>,
    closed: bool,
    /// For the log line at the end: `METHOD /path`, and when the request came.
    log: (String, Instant),
}

impl SseBody {
    pub fn new(
        events: UnboundedReceiver<Streamed>,
        chunker: Chunker,
        tokenizer: Arc<TextTokenizer>,
        vocab: Arc<Vocab>,
        route: String,
    ) -> SseBody {
        let mut first = String::new();
        chunker.start(&mut first);
        SseBody {
            events,
            chunker,
            tokenizer,
            vocab,
            ready: VecDeque::from_iter((!first.is_empty()).then(|| Bytes::from(first))),
            closed: false,
            log: (route, Instant::now()),
        }
    }

    pub fn into_response(self) -> Response {
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
                // Reverse proxies (nginx) would otherwise buffer the stream.
                (header::HeaderName::from_static("x-accel-buffering"), "no"),
            ],
            Body::from_stream(self),
        )
            .into_response()
    }
}

impl futures_core::Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(bytes) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(bytes)));
        }
        if this.closed {
            return Poll::Ready(None);
        }
        // What has arrived goes out in one write (up to about 64 KB).
        let mut out = String::new();
        while !this.chunker.finished() && out.len() < 1 << 16 {
            match this.events.poll_recv(cx) {
                Poll::Ready(Some(event)) => this.chunker.on(event, &this.tokenizer, &this.vocab, &mut out),
                Poll::Ready(None) => {
                    let gone = EngineError("the model thread stopped; see the server's log".into());
                    this.chunker.fail(&gone, &mut out);
                }
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if this.chunker.finished() {
            this.chunker.end(&mut out);
            this.closed = true;
        }
        Poll::Ready(Some(Ok(Bytes::from(out))))
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let usage = self.chunker.usage();
        let how = if self.closed {
            "ended"
        } else {
            "dropped by the client"
        };
        eprintln!(
            "{} stream {how} {}+{} tokens {:.3} s",
            self.log.0,
            usage.prompt_tokens,
            usage.completion_tokens,
            self.log.1.elapsed().as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    /// Streams `text` token by token through a TextStream; returns the pieces and the rest
    /// settled by `finish` with the engine's text.
    fn stream(tok: &TextTokenizer, text: &str, stop: &[&str]) -> (Vec<String>, String) {
        let ids = tok.encode(text, false).unwrap();
        let mut s = TextStream::new(stop.iter().map(|s| s.to_string()).collect());
        let pieces: Vec<String> = ids.iter().map(|&t| s.push(tok, t)).collect();
        let mut whole = tok.decode(&ids, true).unwrap();
        if let Some(cut) = stop.iter().filter_map(|s| whole.find(s)).min() {
            whole.truncate(cut);
        }
        let rest = s.finish(&whole);
        (pieces, rest)
    }

    #[test]
    fn pieces_join_into_the_text_and_split_characters_wait() {
        let tok = tokenizer();
        let text = "Natalia sold 48 clips. Café é, 北京!";
        let (pieces, rest) = stream(&tok, text, &[]);
        assert_eq!(pieces.concat() + &rest, text);
        assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
        // "é" is two byte tokens in the fixture: the first gives nothing, the second the char.
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(ids.len(), 2);
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.push(&tok, ids[0]), "");
        assert_eq!(s.push(&tok, ids[1]), "é");
    }

    #[test]
    fn stop_strings_never_leak() {
        let tok = tokenizer();
        let text = "The answer is 42. Done here, then more text.";
        for stop in ["Done", "42.", "e, th", "xyz", "text."] {
            let (pieces, rest) = stream(&tok, text, &[stop, "never"]);
            let sent = pieces.concat();
            let want = &text[..text.find(stop).unwrap_or(text.len())];
            assert!(want.starts_with(&sent), "{stop:?}: sent {sent:?}");
            assert_eq!(sent + &rest, want, "{stop:?}");
            // No prefix of the stop string ever went out ahead of the text before it.
            let mut acc = String::new();
            for p in &pieces {
                acc.push_str(p);
                assert!(!acc.contains(stop), "{stop:?} leaked: {acc:?}");
            }
        }
        // Text that looks like a stop string's start is held, then released when it is not.
        let mut s = TextStream::new(vec!["Done!".into()]);
        s.text = "Don".into();
        assert_eq!(s.release(), "");
        s.text.push_str("e? no");
        assert_eq!(s.release(), "Done? no");
    }

    fn split_all(pieces: &[&str], in_think: bool) -> Split {
        let mut t = ThinkSplit::new(in_think);
        let mut all = Split::default();
        for p in pieces {
            let s = t.push(p);
            all.reasoning.push_str(&s.reasoning);
            all.content.push_str(&s.content);
        }
        let s = t.finish();
        all.reasoning.push_str(&s.reasoning);
        all.content.push_str(&s.content);
        all
    }

    #[test]
    fn streamed_split_equals_the_whole_text_split() {
        let cases: [(&str, bool); 9] = [
            ("3+4=7\n</think>\n\nIt is 7.", true),
            ("<think>hmm</think>ok", false),
            ("\n<think>\n a b \n</think>\n\n answer  \n", false),
            ("still thinking  ", true),
            (" Paris.\n", false),
            ("<thi", false),
            ("  <thi", true),
            ("<think>\nx</think>", true),
            ("a </thinking> b</think>c", true),
        ];
        for (text, in_think) in cases {
            let whole = api::assistant_message(text, in_think);
            let want = (whole.reasoning_content.unwrap_or_default(), whole.content);
            // Every way of cutting the text into two pieces, and one char at a time.
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let one: Vec<&str> = chars.iter().map(String::as_str).collect();
            let got = split_all(&one, in_think);
            assert_eq!((got.reasoning, got.content), want, "{text:?} by chars");
            for (i, _) in text.char_indices() {
                let got = split_all(&[&text[..i], &text[i..]], in_think);
                assert_eq!(
                    (got.reasoning.clone(), got.content.clone()),
                    want,
                    "{text:?} at {i}"
                );
            }
        }
    }
}
