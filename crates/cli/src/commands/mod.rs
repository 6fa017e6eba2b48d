pub mod generate;
pub mod model_args;
