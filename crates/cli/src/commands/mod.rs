pub mod collect;
pub mod data;
pub mod generate;
pub mod model_args;
pub mod play;
pub mod replay;
pub mod train;
