//! AdamW with decoupled weight decay and bias correction whose state can be saved and restored,
//! and global gradient-norm clipping.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{io_err, Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// The study's recipe: weight decay 0.03.
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.03,
        }
    }
}

/// AdamW over named f32 `Var`s. Moments are kept in f32 whatever the parameter dtype.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    step: u64,
    params: AdamWParams,
    names: Vec<String>,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut m = Vec::with_capacity(vars.len());
        for (_, var) in &vars {
            m.push(var.zeros_like()?.to_dtype(DType::F32)?);
        }
        let v = m.clone();
        Ok(AdamW {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr`: `theta *= 1 - lr*wd`, then
    /// `theta -= lr * m_hat / (sqrt(v_hat) + eps)`. Vars without a gradient are left alone
    /// (their moments too) but the step counter advances.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let theta = var.as_tensor().to_dtype(DType::F32)?;
            let theta = ((theta * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            var.set(&theta.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes `optimizer.safetensors` (moments `m.NAME`, `v.NAME`) and `optimizer.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.insert(format!("m.{name}"), self.m[i].clone());
            tensors.insert(format!("v.{name}"), self.v[i].clone());
        }
        let path = dir.join("optimizer.safetensors");
        candle_core::safetensors::save(&tensors, &path)?;
        let json = StateJson {
            step: self.step,
            params: self.params,
            names: self.vars.iter().map(|(n, _)| n.clone()).collect(),
        };
        let path = dir.join("optimizer.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?).map_err(io_err(&path))?;
        Ok(())
    }

    /// Restores moments and step from [`Self::save`]'s files; the vars must match by name and
    /// shape.
    pub fn load(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let jpath = dir.join("optimizer.json");
        let text = std::fs::read(&jpath).map_err(io_err(&jpath))?;
        let json: StateJson = serde_json::from_slice(&text).map_err(|e| TrainError::State {
            path: jpath.clone(),
            message: format!("not a valid optimizer state (truncated or corrupt?): {e}"),
        })?;
        let names: Vec<&String> = self.vars.iter().map(|(n, _)| n).collect();
        if json.names.iter().collect::<Vec<_>>() != names {
            return Err(TrainError::State {
                path: jpath,
                message: "optimizer state is for other parameters".into(),
            });
        }
        let path = dir.join("optimizer.safetensors");
        let tensors =
            candle_core::safetensors::load(&path, device).map_err(|e| TrainError::State {
                path: path.clone(),
                message: format!("cannot read the optimizer state (truncated or corrupt?): {e}"),
            })?;
        let mut m = Vec::with_capacity(names.len());
        let mut v = Vec::with_capacity(names.len());
        for (name, var) in &self.vars {
            for (prefix, out) in [("m", &mut m), ("v", &mut v)] {
                let t =
                    tensors
                        .get(&format!("{prefix}.{name}"))
                        .ok_or_else(|| TrainError::State {
                            path: path.clone(),
                            message: format!("missing {prefix}.{name}"),
                        })?;
                if t.dims() != var.dims() {
                    return Err(TrainError::State {
                        path: path.clone(),
                        message: format!(
                            "{prefix}.{name}: shape {:?} != {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    });
                }
                out.push(t.to_dtype(DType::F32)?);
            }
        }
        self.m = m;
        self.v = v;
        self.step = json.step;
        self.params = json.params;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars` (missing gradients count as zero).
pub fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut sum = 0f64;
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum.sqrt())
}

/// Scales all gradients by `min(1, max_norm / (norm + 1e-6))`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for (_, var) in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = (g * scale)?;
                grads.insert(var.as_tensor(), g);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(vals: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(vals, &Device::Cpu).unwrap()).unwrap()
    }

    fn grads_for(vars: &[(String, Var)], gs: &[&[f32]]) -> GradStore {
        // A loss whose gradient w.r.t. each var is the given constant vector: sum(var * g).
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for ((_, v), g) in vars.iter().zip(gs) {
            let g = Tensor::new(*g, &Device::Cpu).unwrap();
            loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    #[test]
    fn clipping_matches_hand_computation() {
        let vars = vec![
            ("a".to_owned(), var(&[0.0, 0.0])),
            ("b".to_owned(), var(&[0.0])),
        ];
        // norm = sqrt(3^2 + 4^2 + 12^2) = 13
        let mut grads = grads_for(&vars, &[&[3.0, 4.0], &[12.0]]);
        let norm = clip_grad_norm(&mut grads, &vars, 0.3).unwrap();
        assert!((norm - 13.0).abs() < 1e-9);
        let s = 0.3 / (13.0 + 1e-6);
        let a: Vec<f32> = grads.get(vars[0].1.as_tensor()).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = grads.get(vars[1].1.as_tensor()).unwrap().to_vec1().unwrap();
        for (x, want) in a.iter().chain(&b).zip([3.0 * s, 4.0 * s, 12.0 * s]) {
            assert!((*x as f64 - want).abs() < 1e-7, "{x} vs {want}");
        }
        assert!((grad_norm(&grads, &vars).unwrap() - 0.3).abs() < 1e-6);
        // Under the limit nothing changes.
        let mut grads = grads_for(&vars, &[&[0.03, 0.04], &[0.12]]);
        let norm = clip_grad_norm(&mut grads, &vars, 0.3).unwrap();
        assert!((norm - 0.13).abs() < 1e-7);
        let a: Vec<f32> = grads.get(vars[0].1.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(a, vec![0.03, 0.04]);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        let vars = vec![("w".to_owned(), var(&[1.0, -2.0]))];
        let p = AdamWParams {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vars.clone(), p).unwrap();
        let (lr, g1, g2) = (0.01f64, [0.5f64, -1.0], [0.25f64, 2.0]);
        let g1f = [g1[0] as f32, g1[1] as f32];
        let g2f = [g2[0] as f32, g2[1] as f32];
        opt.step(&grads_for(&vars, &[&g1f]), lr).unwrap();
        opt.step(&grads_for(&vars, &[&g2f]), lr).unwrap();
        let mut theta = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [(1, g1), (2, g2)] {
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                theta[i] = theta[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = vars[0].1.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - theta[i]).abs() < 1e-6,
                "{got:?} vs {theta:?}"
            );
        }
        assert_eq!(opt.step_count(), 2);
    }

    #[test]
    fn adamw_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![("w".to_owned(), var(&[1.0, -2.0]))];
        let mut a = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
        a.step(&grads_for(&vars, &[&[0.5, -1.0]]), 0.1).unwrap();
        a.save(dir.path()).unwrap();
        let vars_b = vec![(
            "w".to_owned(),
            var(&vars[0].1.as_tensor().to_vec1::<f32>().unwrap()),
        )];
        let mut b = AdamW::new(vars_b.clone(), AdamWParams::default()).unwrap();
        b.load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(b.step_count(), 1);
        a.step(&grads_for(&vars, &[&[0.3, 0.7]]), 0.1).unwrap();
        b.step(&grads_for(&vars_b, &[&[0.3, 0.7]]), 0.1).unwrap();
        assert_eq!(
            vars[0].1.as_tensor().to_vec1::<f32>().unwrap(),
            vars_b[0].1.as_tensor().to_vec1::<f32>().unwrap()
        );
        let other = vec![("x".to_owned(), var(&[0.0, 0.0]))];
        let mut c = AdamW::new(other, AdamWParams::default()).unwrap();
        assert!(c.load(dir.path(), &Device::Cpu).is_err());
    }

    /// A truncated or corrupt state names its file (it said "incomplete metadata").
    #[test]
    fn a_truncated_state_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![("w".to_owned(), var(&[1.0, -2.0]))];
        let mut a = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
        a.step(&grads_for(&vars, &[&[0.5, -1.0]]), 0.1).unwrap();
        a.save(dir.path()).unwrap();
        for file in ["optimizer.safetensors", "optimizer.json"] {
            let path = dir.path().join(file);
            let whole = std::fs::read(&path).unwrap();
            std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
            let mut b = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
            let err = b.load(dir.path(), &Device::Cpu).unwrap_err().to_string();
            assert!(
                err.contains(file) && err.contains("truncated or corrupt"),
                "{err}"
            );
            std::fs::write(&path, whole).unwrap();
        }
    }
}
