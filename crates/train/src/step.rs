//! One optimizer step's arithmetic: forward and backward over an accumulation window, with or
//! without gradient checkpointing, and the evaluation loss.

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use teamtune_data::Batch;
use teamtune_llama::{mix_seed, Llama, Mode};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::loss::{batch_inputs, masked_nll_sum};

/// Forward and backward over the micro-batches of one accumulation window. Each micro-batch's
/// loss is its summed (weighted) token NLL divided by the trained tokens (their summed weights)
/// of the whole window, so the summed
/// gradients are those of the window as one batch. The dropout masks of micro-batch `i` derive
/// from `(cfg.seed, step, i)`, so a step can be repeated exactly. Returns the window's mean token
/// loss and the summed gradients of `vars`.
pub fn accumulate(
    model: &mut Llama,
    window: &[Batch],
    vars: &[(String, Var)],
    cfg: &TrainConfig,
    step: usize,
) -> Result<(f64, GradStore)> {
    let weight: f64 = window
        .iter()
        .map(|b| b.trained_weight(cfg.decision_weight))
        .sum();
    let denom = if weight > 0.0 { weight } else { 1.0 };
    let mut acc: Option<GradStore> = None;
    let mut loss = 0f64;
    for (i, batch) in window.iter().enumerate() {
        if batch.trained_tokens() == 0 {
            continue;
        }
        model.set_dropout_seed(Some(mix_seed(&[cfg.seed, step as u64, i as u64])));
        let result = if cfg.gradient_checkpointing {
            checkpointed_grads(model, batch, cfg, denom)
        } else {
            plain_grads(model, batch, cfg, denom)
        };
        model.set_dropout_seed(None);
        let (l, g) = result?;
        loss += l;
        acc = Some(match acc {
            None => g,
            Some(mut a) => {
                add_grads(&mut a, &g, vars.iter().map(|(_, v)| v))?;
                a
            }
        });
    }
    let grads = match acc {
        Some(g) => g,
        None => empty_grads(model)?,
    };
    Ok((loss, grads))
}

/// The loss of one micro-batch scaled by `1/denom`, and its gradients, with the whole graph kept
/// for the backward.
fn plain_grads(
    model: &Llama,
    batch: &Batch,
    cfg: &TrainConfig,
    denom: f64,
) -> Result<(f64, GradStore)> {
    let (ids, layout) = batch_inputs(batch, model.device())?;
    let hidden = model.forward_hidden(&ids, &layout, None, Mode::Training)?;
    let loss = scaled_loss(model, &hidden, batch, cfg, denom)?;
    Ok((loss.to_scalar::<f32>()? as f64, loss.backward()?))
}

/// As [`plain_grads`], keeping only each layer's input during the forward. The backward walks
/// the layers from the top: it recomputes layer `l` from its saved input (same dropout masks,
/// since they are a function of the seed), and back-propagates the gradient of the layer's
/// output through it with `sum(y * dL/dy)`, whose gradient is exactly the chain rule's.
fn checkpointed_grads(
    model: &Llama,
    batch: &Batch,
    cfg: &TrainConfig,
    denom: f64,
) -> Result<(f64, GradStore)> {
    let (ids, layout) = batch_inputs(batch, model.device())?;
    let ctx = model.layer_context(&layout)?;
    let n = model.num_layers();
    let mut inputs = Vec::with_capacity(n);
    let mut x = model.embed(&ids)?;
    for l in 0..n {
        let y = model.forward_layer(l, &x, &ctx, Mode::Training)?.detach();
        inputs.push(x);
        x = y;
    }
    let top = Var::from_tensor(&x)?;
    drop(x);
    let hidden = model.final_norm(top.as_tensor(), Mode::Training)?;
    let loss = scaled_loss(model, &hidden, batch, cfg, denom)?;
    let value = loss.to_scalar::<f32>()? as f64;
    let mut grad_out = take_grad(&mut loss.backward()?, &top)?;
    // The trainable tensors whose per-layer gradients are summed (looked up once, not per layer).
    let vars: Vec<Var> = model
        .active_adapter()
        .and_then(|a| model.adapter(a))
        .map(|a| a.vars())
        .unwrap_or_default();
    let mut total: Option<GradStore> = None;
    for l in (0..n).rev() {
        let input = inputs.pop().expect("one input per layer");
        // The embeddings are frozen: layer 0's input needs no gradient, so it is not a Var.
        let var = if l > 0 {
            Some(Var::from_tensor(&input)?)
        } else {
            None
        };
        let x_in = var.as_ref().map_or(&input, |v| v.as_tensor());
        let y = model.forward_layer(l, x_in, &ctx, Mode::Training)?;
        let mut grads = (y * &grad_out)?.sum_all()?.backward()?;
        if let Some(v) = &var {
            grad_out = take_grad(&mut grads, v)?;
        }
        match &mut total {
            None => total = Some(grads),
            Some(t) => add_grads(t, &grads, vars.iter())?,
        }
    }
    let grads = match total {
        Some(g) => g,
        None => empty_grads(model)?,
    };
    Ok((value, grads))
}

fn scaled_loss(
    model: &Llama,
    hidden: &Tensor,
    batch: &Batch,
    cfg: &TrainConfig,
    denom: f64,
) -> Result<Tensor> {
    let (targets, weights) = batch.weighted_next_token_targets(cfg.pad_id, cfg.decision_weight);
    let nll = masked_nll_sum(model, hidden, &targets, &weights, cfg.loss_chunk)?;
    Ok((nll / denom)?)
}

fn take_grad(grads: &mut GradStore, var: &Var) -> Result<Tensor> {
    grads.remove(var.as_tensor()).ok_or_else(|| {
        TrainError::Config("the backward gave no gradient to a layer's output".into())
    })
}

/// `into += from` for the gradients of `vars`.
fn add_grads<'a>(
    into: &mut GradStore,
    from: &GradStore,
    vars: impl Iterator<Item = &'a Var>,
) -> Result<()> {
    for var in vars {
        if let Some(g) = from.get(var.as_tensor()) {
            let sum = match into.get(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            };
            into.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// An empty gradient store (candle makes them only through a backward).
fn empty_grads(model: &Llama) -> Result<GradStore> {
    Ok(Tensor::zeros((), DType::F32, model.device())?.backward()?)
}

/// Mean token loss of `batches` (summed NLL over all their trained tokens).
pub fn evaluate(model: &Llama, batches: &[Batch], pad_id: u32, chunk: usize) -> Result<f64> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for batch in batches {
        if batch.trained_tokens() == 0 {
            continue;
        }
        let (ids, layout) = batch_inputs(batch, model.device())?;
        let hidden = model
            .forward_hidden(&ids, &layout, None, Mode::Inference)?
            .detach();
        let (targets, weights) = batch.next_token_targets(pad_id);
        sum +=
            masked_nll_sum(model, &hidden, &targets, &weights, chunk)?.to_scalar::<f32>()? as f64;
        count += batch.trained_tokens();
    }
    Ok(sum / count.max(1) as f64)
}
