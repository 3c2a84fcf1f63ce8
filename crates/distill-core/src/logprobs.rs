//! Per-token log-probabilities as OpenAI-compatible servers return them
//! (`choices[].logprobs.content[]`), shared by the teacher client that parses them and the
//! token mapping that turns them into student ids.

/// One generated token: what was sampled, its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token as the server wrote it: its text (a lone byte of a multi-byte character is
    /// U+FFFD here), or `token_id:N` when vLLM runs with `--return-tokens-as-token-ids`.
    pub token: String,
    /// The token's UTF-8 bytes where the server sends them (OpenAI, llama.cpp, Ollama send the
    /// true bytes; vLLM and SGLang encode `token`, so a split character arrives as U+FFFD).
    pub bytes: Option<Vec<u8>>,
    /// Natural log; servers clamp -inf (vLLM to -9999), a null is read as -inf.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first, as the server ordered them.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Option<Vec<u8>>,
    pub logprob: f32,
}
