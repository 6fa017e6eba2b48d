//! Merging an adapter into base weights read from their source: `W + scale * B @ A` in f32,
//! tensor by tensor (the export streams a model this way).

use candle_core::{DType, Device, Tensor};

use super::adapter::LoraAdapter;
use super::config::LoraTarget;
use crate::error::Result;
use crate::load::weights::WeightSource;

/// The merged tensor `name`: read from the source in f32, plus `scale * B @ A` (f32) when
/// the adapter targets it, then cast to `dtype`.
pub(crate) fn merged_tensor(
    weights: &WeightSource,
    adapter: Option<&LoraAdapter>,
    name: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let delta = match (adapter, lora_site(name)) {
        (Some(a), Some((layer, target))) => a.delta(layer, target)?,
        _ => None,
    };
    let w = match delta {
        Some(d) => (weights.get(name, shape, DType::F32, &Device::Cpu)? + d)?,
        None => weights.get(name, shape, DType::F32, &Device::Cpu)?,
    };
    Ok(w.to_dtype(dtype)?.contiguous()?)
}

/// `(layer, target)` of `model.layers.{l}.{self_attn|mlp}.{x}_proj.weight`.
fn lora_site(name: &str) -> Option<(usize, LoraTarget)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let module = module.strip_suffix(".weight")?;
    let target = LoraTarget::parse(module)?;
    (target.layer_path() == module).then_some(())?;
    Some((layer.parse().ok()?, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_sites_are_parsed() {
        assert_eq!(
            lora_site("model.layers.12.mlp.down_proj.weight"),
            Some((12, LoraTarget::Down))
        );
        assert_eq!(
            lora_site("model.layers.0.self_attn.q_proj.weight"),
            Some((0, LoraTarget::Q))
        );
        assert_eq!(lora_site("model.layers.0.mlp.q_proj.weight"), None);
        assert_eq!(lora_site("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(lora_site("lm_head.weight"), None);
    }
}
