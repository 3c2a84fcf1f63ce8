//! The data side of distillation, shared by `gen-data`, `train` and `eval`:
//!
//! - [`prompts`]: prompt sets from JSONL, Parquet or a Hugging Face dataset, with field mapping;
//! - [`sample`]: the sample record every `samples-*.jsonl` line holds (the file contract);
//! - [`shards`]: reading JSONL shards that a killed writer may have left with a torn last line;
//! - [`soft`]: soft labels (the teacher's top-k logprobs per response position): the
//!   safetensors store in `<dataset>/soft/`, its writer, streaming reader and validation;
//! - [`examples`]: samples rendered with a student's chat template into token ids and labels,
//!   split into train / held-out, packed into rows;
//! - [`extract`]: final-answer extraction (`\boxed{}`, `#### n`, numbers) and equivalence, the
//!   one both gen-data's rejection sampling and `distill eval` use.

pub mod examples;
pub mod extract;
pub mod hub;
pub mod prompts;
pub mod sample;
pub mod shards;
pub mod soft;

mod error;

pub use error::DataError;
pub use extract::{Answer, AnswerSource, answers_match, extract_answer, reference_answer};
pub use prompts::{Prompt, PromptSpec, load_prompts};
pub use sample::{ErrorRecord, Message, Sample, Usage, assistant_turn, is_held_out};
pub use soft::{SoftError, SoftLabels, SoftMeta, SoftRecord, SoftWriter};
