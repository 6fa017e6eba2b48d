pub mod collect;
pub mod data;
pub mod generate;
pub mod model_args;
pub mod play;
pub mod recipe;
pub mod replay;
pub mod train;
