//! The model's shape, read once from `deepseek4.*` GGUF metadata and validated.
//!
//! This is the only place that knows metadata key names. Nothing else in the
//! engine spells a dimension: the published V4 Flash file and the tiny fixtures
//! load through the same code. Validation bounds every dimension so a hostile
//! file cannot make the engine allocate absurd buffers before tensor shapes
//! (checked against the file size) are even looked at.

use dsv4_gguf::{GgufFile, Value};

use crate::error::{EngineError, Result};

/// What the gating function key means (`deepseek4.expert_gating_func`); V4 uses 4.
pub const GATING_SQRT_SOFTPLUS: u32 = 4;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Hidden size D.
    pub dim: usize,
    /// Transformer layers (MTP not counted).
    pub n_layers: usize,
    pub vocab: usize,
    pub n_heads: usize,
    /// Per-head width Dh (K = V).
    pub head_dim: usize,
    /// Rotated tail dims Dr of every head (q, kv, compressed rows, indexer heads).
    pub rope_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub n_shared_experts: usize,
    pub expert_ff: usize,
    pub n_hash_layers: usize,
    /// Sliding window W, including the current token.
    pub window: usize,
    pub index_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// Hyper-connection streams M.
    pub hc: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub rms_eps: f32,
    /// Compress ratio per layer; `n_layers + n_mtp` entries (missing MTP entries are 0).
    pub compress_ratios: Vec<usize>,
    /// SwiGLU clamp per layer (MTP layers use the last main layer's value).
    pub swiglu_limits: Vec<f32>,
    pub rope_theta: f32,
    pub compress_rope_theta: f32,
    pub yarn_factor: f32,
    pub yarn_original_ctx: u64,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    pub route_scale: f32,
    pub weights_norm: bool,
    pub n_mtp: usize,
    /// Informational (`deepseek4.context_length`).
    pub context_length: u64,
}

/// Upper bound for any single dimension read from metadata: larger than every
/// real value (vocab 129280, E·F products are checked via tensor sizes), small
/// enough that products of two stay far from overflow.
const MAX_DIM: u64 = 1 << 24;

struct Meta<'a>(&'a GgufFile);

impl Meta<'_> {
    fn raw(&self, key: &str) -> Result<&Value> {
        self.0.get(key).ok_or_else(|| EngineError::Config(format!("missing metadata key `{key}`")))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.raw(key)?;
        let n = v.as_u64().ok_or_else(|| {
            EngineError::Config(format!("metadata `{key}` must be an unsigned integer, found {}", v.type_name()))
        })?;
        if n > MAX_DIM {
            return Err(EngineError::Config(format!("metadata `{key}` = {n} is out of range")));
        }
        Ok(n as usize)
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.0.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }
    fn f32(&self, key: &str) -> Result<f32> {
        let v = self.raw(key)?;
        let x = v
            .as_f64()
            .ok_or_else(|| EngineError::Config(format!("metadata `{key}` must be a number, found {}", v.type_name())))?;
        if !x.is_finite() {
            return Err(EngineError::Config(format!("metadata `{key}` is not finite")));
        }
        Ok(x as f32)
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        if self.0.get(key).is_some() {
            self.f32(key)
        } else {
            Ok(default)
        }
    }
    fn array(&self, key: &str) -> Result<&[Value]> {
        let v = self.raw(key)?;
        v.as_array().ok_or_else(|| EngineError::Config(format!("metadata `{key}` must be an array, found {}", v.type_name())))
    }
}

impl Config {
    pub fn from_gguf(f: &GgufFile) -> Result<Config> {
        let m = Meta(f);
        if let Some(arch) = f.get("general.architecture") {
            if arch.as_str() != Some("deepseek4") {
                return Err(EngineError::Config(format!(
                    "general.architecture is {:?}, expected \"deepseek4\"",
                    arch.as_str().unwrap_or("<not a string>")
                )));
            }
        }
        let p = "deepseek4.";
        let k = |s: &str| format!("{p}{s}");
        let n_layers = m.usize(&k("block_count"))?;
        let n_mtp = m.usize_or(&k("nextn_predict_layers"), 0)?;
        let ratios_raw = m.array(&k("attention.compress_ratios"))?;
        if ratios_raw.len() < n_layers {
            return Err(EngineError::Config(format!(
                "deepseek4.attention.compress_ratios has {} entries, need at least block_count = {n_layers}",
                ratios_raw.len()
            )));
        }
        let mut compress_ratios = Vec::with_capacity(n_layers + n_mtp);
        for (i, v) in ratios_raw.iter().take(n_layers + n_mtp).enumerate() {
            let r = v.as_i64().filter(|&r| (0..=1 << 20).contains(&r)).ok_or_else(|| {
                EngineError::Config(format!("compress_ratios[{i}] is not a valid ratio ({v:?})"))
            })? as usize;
            if r == 1 {
                return Err(EngineError::Config(format!("compress_ratios[{i}] = 1 is not supported (0 or ≥ 2)")));
            }
            compress_ratios.push(r);
        }
        while compress_ratios.len() < n_layers + n_mtp {
            compress_ratios.push(0); // the MTP block is window-only when the array omits it
        }
        let limits_raw = m.array(&k("swiglu_clamp_exp"))?;
        if limits_raw.len() < n_layers {
            return Err(EngineError::Config(format!(
                "deepseek4.swiglu_clamp_exp has {} entries, need {n_layers}",
                limits_raw.len()
            )));
        }
        let mut swiglu_limits = Vec::with_capacity(n_layers + n_mtp);
        for (i, v) in limits_raw.iter().take(n_layers).enumerate() {
            let x = v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                EngineError::Config(format!("swiglu_clamp_exp[{i}] is not a finite number"))
            })?;
            swiglu_limits.push(x as f32);
        }
        let last = swiglu_limits.last().copied().unwrap_or(0.0);
        while swiglu_limits.len() < n_layers + n_mtp {
            swiglu_limits.push(last);
        }
        if let Some(v) = f.get(&k("expert_gating_func")) {
            if v.as_u64() != Some(GATING_SQRT_SOFTPLUS as u64) {
                return Err(EngineError::Config(format!(
                    "deepseek4.expert_gating_func = {v:?}: only 4 (sqrt-softplus) is supported"
                )));
            }
        }
        if m.usize_or(&k("expert_group_count"), 0)? > 1 {
            return Err(EngineError::Config("group-limited expert routing is not supported".into()));
        }
        let key_len = m.usize(&k("attention.key_length"))?;
        let val_len = m.usize_or(&k("attention.value_length"), key_len)?;
        if key_len != val_len {
            return Err(EngineError::Config(format!("key_length {key_len} != value_length {val_len}")));
        }
        let kv_heads = m.usize_or(&k("attention.head_count_kv"), 1)?;
        if kv_heads != 1 {
            return Err(EngineError::Config(format!("head_count_kv = {kv_heads}; DeepSeek V4 has one shared KV head")));
        }
        let weights_norm = match f.get(&k("expert_weights_norm")) {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| EngineError::Config("expert_weights_norm must be a bool".into()))?,
        };
        let c = Config {
            dim: m.usize(&k("embedding_length"))?,
            n_layers,
            vocab: m.usize(&k("vocab_size"))?,
            n_heads: m.usize(&k("attention.head_count"))?,
            head_dim: key_len,
            rope_dim: m.usize(&k("rope.dimension_count"))?,
            q_lora_rank: m.usize(&k("attention.q_lora_rank"))?,
            o_groups: m.usize(&k("attention.output_group_count"))?,
            o_lora_rank: m.usize(&k("attention.output_lora_rank"))?,
            n_experts: m.usize(&k("expert_count"))?,
            n_experts_used: m.usize(&k("expert_used_count"))?,
            n_shared_experts: m.usize_or(&k("expert_shared_count"), 1)?,
            expert_ff: m.usize(&k("expert_feed_forward_length"))?,
            n_hash_layers: m.usize_or(&k("hash_layer_count"), 0)?,
            window: m.usize(&k("attention.sliding_window"))?,
            index_heads: m.usize(&k("attention.indexer.head_count"))?,
            index_head_dim: m.usize(&k("attention.indexer.key_length"))?,
            index_topk: m.usize(&k("attention.indexer.top_k"))?,
            hc: m.usize(&k("hyper_connection.count"))?,
            sinkhorn_iters: m.usize(&k("hyper_connection.sinkhorn_iterations"))?,
            hc_eps: m.f32_or(&k("hyper_connection.epsilon"), 1e-6)?,
            rms_eps: m.f32_or(&k("attention.layer_norm_rms_epsilon"), 1e-6)?,
            compress_ratios,
            swiglu_limits,
            rope_theta: m.f32(&k("rope.freq_base"))?,
            compress_rope_theta: m.f32(&k("attention.compress_rope_freq_base"))?,
            yarn_factor: m.f32(&k("rope.scaling.factor"))?,
            yarn_original_ctx: m.usize(&k("rope.scaling.original_context_length"))? as u64,
            yarn_beta_fast: m.f32(&k("rope.scaling.yarn_beta_fast"))?,
            yarn_beta_slow: m.f32(&k("rope.scaling.yarn_beta_slow"))?,
            route_scale: m.f32(&k("expert_weights_scale"))?,
            weights_norm,
            n_mtp,
            context_length: f.get(&k("context_length")).and_then(|v| v.as_u64()).unwrap_or(0),
        };
        c.validate()?;
        Ok(c)
    }

    /// The published DeepSeek V4 Flash shape (spec model.md §1), for synthetic
    /// full-size benchmarks where no GGUF is at hand. Loading a real file always
    /// goes through `from_gguf`.
    pub fn v4_flash() -> Config {
        let n_layers = 43;
        let mut compress_ratios = vec![0, 0];
        for l in 2..n_layers {
            compress_ratios.push(if l % 2 == 0 { 4 } else { 128 });
        }
        compress_ratios.push(0); // MTP block
        Config {
            dim: 4096,
            n_layers,
            vocab: 129280,
            n_heads: 64,
            head_dim: 512,
            rope_dim: 64,
            q_lora_rank: 1024,
            o_groups: 8,
            o_lora_rank: 1024,
            n_experts: 256,
            n_experts_used: 6,
            n_shared_experts: 1,
            expert_ff: 2048,
            n_hash_layers: 3,
            window: 128,
            index_heads: 64,
            index_head_dim: 128,
            index_topk: 512,
            hc: 4,
            sinkhorn_iters: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
            compress_ratios,
            swiglu_limits: vec![10.0; n_layers + 1],
            rope_theta: 10000.0,
            compress_rope_theta: 160000.0,
            yarn_factor: 16.0,
            yarn_original_ctx: 65536,
            yarn_beta_fast: 32.0,
            yarn_beta_slow: 1.0,
            route_scale: 1.5,
            weights_norm: true,
            n_mtp: 1,
            context_length: 1 << 20,
        }
    }

    /// Bytes of main-model sequence state at `ctx` tokens as this engine stores
    /// it (packed rows, f32 RoPE dims, f32 window and compressor state).
    pub fn state_bytes(&self, ctx: usize) -> crate::pack::StateBytes {
        self.state_bytes_with(ctx, crate::pack::RopeStore::F32)
    }

    /// `state_bytes` with the compressed rows' RoPE dims held as `rope` (`--kv-rope`).
    pub fn state_bytes_with(&self, ctx: usize, rope: crate::pack::RopeStore) -> crate::pack::StateBytes {
        crate::pack::StateBytes::for_ctx(self, ctx, rope)
    }

    /// The same shape with only the first `n` layers (benchmarks on smaller GPUs).
    pub fn with_layers(&self, n: usize) -> Config {
        let mut c = self.clone();
        let n = n.min(self.n_layers);
        c.n_layers = n;
        c.compress_ratios = self.compress_ratios[..n].to_vec();
        c.compress_ratios.push(0);
        c.swiglu_limits = self.swiglu_limits[..n].to_vec();
        c.swiglu_limits.push(self.swiglu_limits.last().copied().unwrap_or(10.0));
        c.n_hash_layers = c.n_hash_layers.min(n);
        c
    }

    /// Structural checks the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(EngineError::Config(msg));
        for (name, v) in [
            ("embedding_length", self.dim),
            ("block_count", self.n_layers),
            ("vocab_size", self.vocab),
            ("head_count", self.n_heads),
            ("key_length", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("output_group_count", self.o_groups),
            ("output_lora_rank", self.o_lora_rank),
            ("expert_count", self.n_experts),
            ("expert_used_count", self.n_experts_used),
            ("expert_feed_forward_length", self.expert_ff),
            ("sliding_window", self.window),
            ("hyper_connection.count", self.hc),
            ("sinkhorn_iterations", self.sinkhorn_iters),
        ] {
            if v == 0 {
                return bad(format!("deepseek4 {name} must be > 0"));
            }
        }
        if self.rope_dim == 0 || self.rope_dim % 2 != 0 || self.rope_dim > self.head_dim {
            return bad(format!("rope.dimension_count {} must be even, > 0 and ≤ head dim {}", self.rope_dim, self.head_dim));
        }
        if (self.head_dim - self.rope_dim) % 64 != 0 {
            return bad(format!(
                "head dim {} minus rope dims {} must be a multiple of the FP8 block (64)",
                self.head_dim, self.rope_dim
            ));
        }
        if self.n_heads % self.o_groups != 0 {
            return bad(format!("head_count {} not divisible by output groups {}", self.n_heads, self.o_groups));
        }
        if self.n_experts_used > self.n_experts {
            return bad(format!("expert_used_count {} > expert_count {}", self.n_experts_used, self.n_experts));
        }
        if self.n_shared_experts > 1 {
            return bad(format!("expert_shared_count {} unsupported (0 or 1)", self.n_shared_experts));
        }
        if self.n_hash_layers > self.n_layers {
            return bad(format!("hash_layer_count {} > block_count {}", self.n_hash_layers, self.n_layers));
        }
        if self.n_mtp > 1 {
            return bad(format!("nextn_predict_layers {} unsupported (0 or 1)", self.n_mtp));
        }
        if self.compress_ratios.iter().any(|&r| r == 4) {
            let d = self.index_head_dim;
            if d == 0 || !d.is_power_of_two() || d % 32 != 0 || d < self.rope_dim || self.index_heads == 0 || self.index_topk == 0 {
                return bad(format!(
                    "indexer head dim {d} must be a power of two, a multiple of 32 and ≥ rope dims; heads/top_k > 0"
                ));
            }
        }
        if self.compress_ratios.len() < self.n_layers || self.swiglu_limits.len() < self.n_layers {
            return bad("compress_ratios / swiglu limits shorter than the layer count".into());
        }
        for (i, &r) in self.compress_ratios.iter().enumerate() {
            if i >= self.n_layers && r != 0 {
                return bad(format!("MTP layer compress ratio {r}: only window-only MTP blocks are supported"));
            }
        }
        if !(self.yarn_factor > 0.0) || self.yarn_original_ctx == 0 || !(self.rope_theta > 1.0) || !(self.compress_rope_theta > 1.0) {
            return bad("rope / YaRN parameters out of range".into());
        }
        Ok(())
    }

    /// Attention compressor overlap factor: ratio 4 uses overlapping windows (2 lanes).
    pub fn coff(&self, layer: usize) -> usize {
        if self.compress_ratios[layer] == 4 {
            2
        } else {
            1
        }
    }
    pub fn has_indexer(&self, layer: usize) -> bool {
        self.compress_ratios[layer] == 4
    }
    pub fn is_hash_layer(&self, layer: usize) -> bool {
        layer < self.n_hash_layers
    }
    /// Non-RoPE dims of a head (FP8-simulated in KV rows).
    pub fn nope_dim(&self) -> usize {
        self.head_dim - self.rope_dim
    }
    pub fn yarn(&self) -> crate::ops::Yarn {
        crate::ops::Yarn {
            factor: self.yarn_factor,
            original_ctx: self.yarn_original_ctx as f64,
            beta_fast: self.yarn_beta_fast as f64,
            beta_slow: self.yarn_beta_slow as f64,
        }
    }
    /// Growing KV state per token in values (spec §14), for memory reports.
    pub fn state_values_per_token(&self) -> f64 {
        let mut v = 0.0;
        for l in 0..self.n_layers {
            let r = self.compress_ratios[l];
            if r != 0 {
                v += self.head_dim as f64 / r as f64;
                if r == 4 {
                    v += self.index_head_dim as f64 / r as f64;
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_flash_validates_and_counts_state() {
        let c = Config::v4_flash();
        c.validate().unwrap();
        assert_eq!(c.compress_ratios.iter().filter(|&&r| r == 4).count(), 21);
        assert_eq!(c.compress_ratios.iter().filter(|&&r| r == 128).count(), 20);
        // spec §14: 3440 values per token of growing state
        assert_eq!(c.state_values_per_token(), 3440.0);
        let c3 = c.with_layers(3);
        c3.validate().unwrap();
        assert_eq!(c3.compress_ratios, vec![0, 0, 4, 0]);
    }
}
