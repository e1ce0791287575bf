//! AdamW with decoupled weight decay (`torch.optim.AdamW`, the optimiser of BLIP's training
//! scripts) and the warm-up + cosine learning-rate schedule.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};

use super::Result;

/// AdamW hyper-parameters (defaults: torch's betas and eps, BLIP's weight decay 0.05).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (`param *= 1 - lr * weight_decay` before the Adam step).
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// AdamW over named variables. Its state (moments and step count) can be saved and restored, so
/// an interrupted run resumes exactly.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// First and second moments by variable name (absent until the variable first gets a gradient).
    moments: HashMap<String, (Tensor, Tensor)>,
    /// Steps taken so far.
    pub step: u64,
    /// Hyper-parameters.
    pub params: AdamWParams,
}

impl AdamW {
    /// An optimiser over `vars` (name, variable).
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Self {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            vars,
            moments: HashMap::new(),
            step: 0,
            params,
        }
    }

    /// One step at learning rate `lr`. Like torch, a variable without a gradient is left alone
    /// (no decay either).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let (m, v) = match self.moments.remove(name) {
                Some((m, v)) => (m, v),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let theta = (var.as_tensor().detach() * (1.0 - lr * p.weight_decay))?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((&m / denom)? * (lr / bc1))?;
            var.set(&(theta - update)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// The moments as tensors named `m.NAME` / `v.NAME` (for saving).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) {
        self.moments.clear();
        for (name, _) in &self.vars {
            if let (Some(m), Some(v)) = (
                tensors.get(&format!("m.{name}")),
                tensors.get(&format!("v.{name}")),
            ) {
                self.moments.insert(name.clone(), (m.clone(), v.clone()));
            }
        }
        self.step = step;
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then a cosine from `peak` to `min` at
/// `total` steps (BLIP warms up linearly and decays with a cosine; here both are per step).
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Final learning rate.
    pub min: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        self.min + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            peak: 1e-3,
            min: 0.0,
            warmup: 10,
            total: 110,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(60) - 5e-4).abs() < 1e-12);
        assert!(s.at(110).abs() < 1e-12);
        assert!(s.at(1000).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // At step 1, m_hat / sqrt(v_hat) = sign(g): every weight moves by lr (plus decay).
        let var = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &Tensor::new(&[2.0f32, -1.0, 0.5], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWParams::default());
        opt.step(&grads, 0.1).unwrap();
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let decay = 1.0 - 0.1 * 0.05;
        let want = [1.0 * decay - 0.1, -2.0 * decay + 0.1, 3.0 * decay - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w as f32).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
