//! What an adapter is made of: the projections it may target and its hyper-parameters.

use crate::load::config::LlamaConfig;

/// A projection of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module name PEFT uses in `target_modules` (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The path of the projection inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn layer_path(self) -> String {
        let block = match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            _ => "mlp",
        };
        format!("{block}.{}", self.module_name())
    }

    /// Parses `q_proj` (or a dotted path ending in it, e.g. `self_attn.q_proj`).
    pub fn parse(name: &str) -> Option<Self> {
        let last = name.rsplit('.').next().unwrap_or(name);
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.module_name() == last)
    }

    /// `[out, in]` of this projection in a model with `config`.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (nq, nkv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        match self {
            LoraTarget::Q => (nq, h),
            LoraTarget::K | LoraTarget::V => (nkv, h),
            LoraTarget::O => (h, nq),
            LoraTarget::Gate | LoraTarget::Up => (i, h),
            LoraTarget::Down => (h, i),
        }
    }
}

/// The hyper-parameters of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input, applied in `Mode::Training` only.
    pub dropout: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    pub targets: Vec<LoraTarget>,
    /// Written to `adapter_config.json` so that PEFT knows the base model.
    pub base_model_name_or_path: Option<String>,
    /// Seed of the A initialisation (deterministic on every device).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            targets: LoraTarget::ALL.to_vec(),
            base_model_name_or_path: None,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The factor of the adapter branch: `alpha / r` or, with rsLoRA, `alpha / sqrt(r)`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("LoRA rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if !self.alpha.is_finite() {
            return Err(format!("LoRA alpha must be finite, got {}", self.alpha));
        }
        if self.targets.is_empty() {
            return Err("LoRA needs at least one target module".into());
        }
        Ok(())
    }

    /// The targets sorted and without duplicates.
    pub(super) fn normalized_targets(&self) -> Vec<LoraTarget> {
        let mut t = self.targets.clone();
        t.sort();
        t.dedup();
        t
    }
}
