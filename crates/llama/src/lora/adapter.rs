//! LoRA adapters on the decoder projections: the factors and their math.
//!
//! An adapter adds `scale * B(A(dropout(x)))` to a frozen projection `W x`, with `A [r, in]`
//! and `B [out, r]` trainable f32 `Var`s (PEFT init: A uniform in +-1/sqrt(in), B zero, so a
//! fresh adapter leaves the model unchanged). `scale` is `alpha / r`, or `alpha / sqrt(r)`
//! with rsLoRA. The base weights go through [`crate::kernels::FrozenMatmul`], whose backward
//! returns only the input gradient, so training never computes or stores a weight-sized
//! gradient for them.

use std::collections::BTreeMap;
use teamtune_seed::SplitMix64;

use candle_core::{DType, Device, Tensor, Var};

use super::config::{LoraConfig, LoraTarget};
use super::peft::peft_tensor_name;
use crate::error::{LlamaError, Result};
use crate::load::config::LlamaConfig;

/// The two factors of one adapted projection, f32: `a [r, in]`, `b [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// One adapter: its config and the factors of every adapted projection of every layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub(super) config: LoraConfig,
    pub(super) layers: Vec<BTreeMap<LoraTarget, LoraPair>>,
}

/// The adapter of one projection as the forward uses it.
pub(crate) struct ActiveLora<'a> {
    pub pair: &'a LoraPair,
    pub scale: f64,
    pub dropout: f32,
    /// Seed of this projection's dropout mask; `None`: the device's own generator.
    pub dropout_seed: Option<u64>,
}

impl LoraAdapter {
    /// A fresh adapter with PEFT's init for a model with `model_config` on `device`.
    pub fn new(model_config: &LlamaConfig, config: &LoraConfig, device: &Device) -> Result<Self> {
        config
            .validate()
            .map_err(|m| LlamaError::Shape(format!("invalid LoRA config: {m}")))?;
        let mut config = config.clone();
        config.targets = config.normalized_targets();
        let mut rng = SplitMix64::new(config.seed);
        let r = config.rank;
        let mut layers = Vec::with_capacity(model_config.num_hidden_layers);
        for _ in 0..model_config.num_hidden_layers {
            let mut map = BTreeMap::new();
            for &t in &config.targets {
                let (out, inp) = t.shape(model_config);
                // kaiming_uniform(a = sqrt(5)) as PEFT/nn.Linear: bound = 1/sqrt(fan_in).
                let bound = 1.0 / (inp as f64).sqrt();
                let data: Vec<f32> = (0..r * inp)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(data, (r, inp), device)?)?;
                let b = Var::zeros((out, r), DType::F32, device)?;
                map.insert(t, LoraPair { a, b });
            }
            layers.push(map);
        }
        Ok(LoraAdapter { config, layers })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Sets the dropout on the adapter's input (training only). A loaded adapter carries the
    /// dropout it was trained with in adapter_config.json; a run that continues it trains with
    /// its own recipe's.
    pub fn set_dropout(&mut self, dropout: f32) -> Result<()> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(LlamaError::Shape(format!(
                "invalid LoRA config: dropout must be at least 0 and below 1 (got {dropout})"
            )));
        }
        self.config.dropout = dropout;
        Ok(())
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The factors of `target` in `layer`, if adapted.
    pub fn pair(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|m| m.get(&target))
    }

    /// Every trainable tensor with its PEFT name, in a stable order (layer, target, A, B).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, map) in self.layers.iter().enumerate() {
            for (&t, p) in map {
                out.push((peft_tensor_name(l, t, 'A'), p.a.clone()));
                out.push((peft_tensor_name(l, t, 'B'), p.b.clone()));
            }
        }
        out
    }

    /// Every trainable tensor, in the order of [`Self::named_vars`].
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    pub(crate) fn active(&self, layer: usize, target: LoraTarget) -> Option<ActiveLora<'_>> {
        self.pair(layer, target).map(|pair| ActiveLora {
            pair,
            scale: self.config.scale(),
            dropout: self.config.dropout,
            dropout_seed: None,
        })
    }

    /// `scale * B @ A`, f32 `[out, in]`: what merging adds to the base weight.
    pub fn delta(&self, layer: usize, target: LoraTarget) -> Result<Option<Tensor>> {
        match self.pair(layer, target) {
            None => Ok(None),
            Some(p) => Ok(Some(
                (p.b.as_tensor().matmul(p.a.as_tensor())? * self.config.scale())?,
            )),
        }
    }
}
