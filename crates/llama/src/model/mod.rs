//! The LLaMA decoder: the model and its layers, its projections and their weight backends,
//! where the tokens of a forward sit (`layout`) and the keys and values of earlier ones (`cache`).

mod blocks;
pub(crate) mod cache;
pub(crate) mod layout;
pub(crate) mod linear;
pub(crate) mod llama;
