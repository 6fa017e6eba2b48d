//! Turning a model's logits into tokens and text: conversations that keep their KV cache,
//! decoding many of them as one batch, sampling, one-shot generation and text streaming.

pub(crate) mod batch;
pub(crate) mod continuous;
pub(crate) mod generate;
pub(crate) mod sampling;
pub(crate) mod session;
pub(crate) mod stream;
