//! What every distill stage shares: the recipe schema, manifests, atomic file writes and the
//! safetensors writer; and what the workspace's tests share ([`testing`]).

pub mod fsutil;
pub mod logprobs;
pub mod message;
pub mod progress;
pub mod recipe;
pub mod tensorfile;
pub mod testing;

pub use logprobs::{TokenLogprob, TopLogprob};
pub use message::Message;
pub use recipe::{Recipe, RecipeError};

/// The version written into every manifest.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
