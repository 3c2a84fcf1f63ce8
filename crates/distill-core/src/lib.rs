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

/// The text a panic was raised with (`panic!`'s message), when it has one: what a caught
/// panic (a backend out of memory, say) is reported as.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// The version written into every manifest.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
