//! What to write: the DeepSeek V4 model read from `config.json`, the GGUF
//! metadata derived from it, and the ordered tensor plan (GGUF name, type per
//! recipe, `ne`, and which official tensors feed it), exactly in the names,
//! shapes and order of the ds4 files (gguf.md §3, fixtures README tiny-hf).

use std::path::Path;

use dsv4_gguf::{GgmlType, Value};
use serde_json::Value as Json;

use crate::gguf_stream::TensorSpec;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
}

/// Quantisation recipe (gguf.md §3.4; f16 / q8 are reference recipes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    F16,
    Q8,
    Q4,
    Q2,
}

impl Recipe {
    pub fn parse(s: &str) -> Option<Recipe> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f16" => Recipe::F16,
            "q8" => Recipe::Q8,
            "q4" => Recipe::Q4,
            "q2" => Recipe::Q2,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Recipe::F16 => "f16",
            Recipe::Q8 => "q8",
            Recipe::Q4 => "q4",
            Recipe::Q2 => "q2",
        }
    }
}

/// What a tensor is, which decides its GGUF type under each recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embed,
    Output,
    /// Attention projections, shared experts, MTP e_proj / h_proj: Q8_0 in q8/q4/q2.
    Q8Matrix,
    /// HC fns, compressors, indexer, router, ape: always F16.
    F16Matrix,
    /// Norms, sinks, HC base / scale, router bias: always F32.
    Vector,
    RoutedGateUp,
    RoutedDown,
    Tid2eid,
}

pub fn gguf_type(recipe: Recipe, role: Role) -> GgmlType {
    use GgmlType as T;
    match (role, recipe) {
        (Role::Vector, _) => T::F32,
        (Role::Tid2eid, _) => T::I32,
        (Role::Embed | Role::F16Matrix, _) => T::F16,
        (_, Recipe::F16) => T::F16,
        (Role::Output | Role::Q8Matrix, _) => T::Q8_0,
        (Role::RoutedGateUp | Role::RoutedDown, Recipe::Q8) => T::Q8_0,
        (Role::RoutedGateUp | Role::RoutedDown, Recipe::Q4) => T::Q4_K,
        (Role::RoutedGateUp, Recipe::Q2) => T::IQ2_XXS,
        (Role::RoutedDown, Recipe::Q2) => T::Q2_K,
    }
}

/// Where a GGUF tensor's values come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// One official tensor (FP8 + scale, BF16, F32, ...).
    Matrix(String),
    /// `{prefix}.{e}.{w}.weight` for e in 0..n, stacked along ne[2].
    Experts { prefix: String, w: &'static str, n: usize },
    /// `tid2eid` I64 → I32.
    Tid2eid(String),
}

#[derive(Clone, Debug)]
pub struct PlanItem {
    pub spec: TensorSpec,
    pub role: Role,
    pub source: Source,
    pub mtp: bool,
}

/// The model hyper-parameters the converter needs (official config.json names).
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub dim: usize,
    pub vocab: usize,
    pub n_layers: usize,
    pub n_mtp: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub q_lora: usize,
    pub o_groups: usize,
    pub o_lora: usize,
    pub n_experts: usize,
    pub n_used: usize,
    pub n_shared: usize,
    pub inter: usize,
    pub n_hash: usize,
    pub window: usize,
    pub idx_heads: usize,
    pub idx_dim: usize,
    pub idx_topk: usize,
    pub hc: usize,
    pub sinkhorn: usize,
    pub hc_eps: f64,
    pub rms_eps: f64,
    pub compress_ratios: Vec<i64>,
    pub rope_theta: f64,
    pub compress_rope_theta: f64,
    pub rope_factor: f64,
    pub original_ctx: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub route_scale: f64,
    pub swiglu_limit: f64,
    pub norm_topk: bool,
    pub context_length: u64,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig, PlanError> {
        let p = path.display().to_string();
        let e = |msg: String| PlanError::Config { path: p.clone(), msg };
        let text = std::fs::read_to_string(path).map_err(|x| e(x.to_string()))?;
        let j: Json = serde_json::from_str(&text).map_err(|x| e(format!("not valid JSON: {x}")))?;
        Self::from_json(&j).map_err(e)
    }

    pub fn from_json(j: &Json) -> Result<ModelConfig, String> {
        let u = |k: &str| -> Result<usize, String> {
            j.get(k).and_then(Json::as_u64).and_then(|v| usize::try_from(v).ok()).ok_or_else(|| format!("missing or non-integer key {k:?}"))
        };
        let uo = |k: &str, d: usize| -> Result<usize, String> { if j.get(k).is_some() { u(k) } else { Ok(d) } };
        let f = |v: Option<&Json>, k: &str| -> Result<f64, String> { v.and_then(Json::as_f64).ok_or_else(|| format!("missing or non-numeric key {k:?}")) };
        let rs = j.get("rope_scaling").ok_or("missing key \"rope_scaling\"")?;
        if let Some(s) = j.get("scoring_func").and_then(Json::as_str) {
            if s != "sqrtsoftplus" {
                return Err(format!("scoring_func {s:?} is not DeepSeek V4's sqrtsoftplus"));
            }
        }
        let ratios = j
            .get("compress_ratios")
            .and_then(Json::as_array)
            .ok_or("missing array \"compress_ratios\"")?
            .iter()
            .map(|v| v.as_i64().filter(|&r| (0..=1 << 20).contains(&r)))
            .collect::<Option<Vec<_>>>()
            .ok_or("compress_ratios must be non-negative integers")?;
        let c = ModelConfig {
            dim: u("hidden_size")?,
            vocab: u("vocab_size")?,
            n_layers: u("num_hidden_layers")?,
            n_mtp: uo("num_nextn_predict_layers", 0)?,
            n_heads: u("num_attention_heads")?,
            head_dim: u("head_dim")?,
            rope_dim: u("qk_rope_head_dim")?,
            q_lora: u("q_lora_rank")?,
            o_groups: u("o_groups")?,
            o_lora: u("o_lora_rank")?,
            n_experts: u("n_routed_experts")?,
            n_used: u("num_experts_per_tok")?,
            n_shared: uo("n_shared_experts", 1)?,
            inter: u("moe_intermediate_size")?,
            n_hash: uo("num_hash_layers", 0)?,
            window: u("sliding_window")?,
            idx_heads: u("index_n_heads")?,
            idx_dim: u("index_head_dim")?,
            idx_topk: u("index_topk")?,
            hc: u("hc_mult")?,
            sinkhorn: u("hc_sinkhorn_iters")?,
            hc_eps: f(j.get("hc_eps"), "hc_eps")?,
            rms_eps: f(j.get("rms_norm_eps"), "rms_norm_eps")?,
            compress_ratios: ratios,
            rope_theta: f(j.get("rope_theta"), "rope_theta")?,
            compress_rope_theta: f(j.get("compress_rope_theta"), "compress_rope_theta")?,
            rope_factor: f(rs.get("factor"), "rope_scaling.factor")?,
            original_ctx: rs
                .get("original_max_position_embeddings")
                .and_then(Json::as_u64)
                .ok_or("missing rope_scaling.original_max_position_embeddings")?,
            beta_fast: f(rs.get("beta_fast"), "rope_scaling.beta_fast")?,
            beta_slow: f(rs.get("beta_slow"), "rope_scaling.beta_slow")?,
            route_scale: f(j.get("routed_scaling_factor"), "routed_scaling_factor")?,
            swiglu_limit: f(j.get("swiglu_limit"), "swiglu_limit")?,
            norm_topk: j.get("norm_topk_prob").and_then(Json::as_bool).unwrap_or(true),
            context_length: j.get("max_position_embeddings").and_then(Json::as_u64).unwrap_or(0),
        };
        if c.compress_ratios.len() < c.n_layers {
            return Err(format!("compress_ratios has {} entries for {} layers", c.compress_ratios.len(), c.n_layers));
        }
        if c.n_heads * c.head_dim % c.o_groups.max(1) != 0 || c.o_groups == 0 {
            return Err("num_attention_heads * head_dim must divide into o_groups".into());
        }
        if c.n_mtp > 1 {
            return Err(format!("num_nextn_predict_layers = {}: only 0 or 1 MTP block is supported", c.n_mtp));
        }
        Ok(c)
    }

    /// Compress ratio of layer `i` (`i == n_layers` is the MTP block).
    pub fn ratio(&self, i: usize) -> usize {
        self.compress_ratios.get(i).copied().unwrap_or(0) as usize
    }

    /// `deepseek4.*` metadata, with the key set and value types of the ds4 files.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let k = |s: &str| format!("deepseek4.{s}");
        let u32v = |x: usize| Value::U32(x as u32);
        let f = |x: f64| Value::F32(x as f32);
        let mut ratios: Vec<Value> = self.compress_ratios.iter().take(self.n_layers + self.n_mtp).map(|&r| Value::I32(r as i32)).collect();
        while ratios.len() < self.n_layers + self.n_mtp {
            ratios.push(Value::I32(0));
        }
        vec![
            (k("context_length"), Value::U32(self.context_length.min(u32::MAX as u64) as u32)),
            (k("embedding_length"), u32v(self.dim)),
            (k("vocab_size"), u32v(self.vocab)),
            (k("block_count"), u32v(self.n_layers)),
            (k("nextn_predict_layers"), u32v(self.n_mtp)),
            (k("attention.head_count"), u32v(self.n_heads)),
            (k("attention.head_count_kv"), Value::U32(1)),
            (k("attention.key_length"), u32v(self.head_dim)),
            (k("attention.value_length"), u32v(self.head_dim)),
            (k("attention.q_lora_rank"), u32v(self.q_lora)),
            (k("attention.output_lora_rank"), u32v(self.o_lora)),
            (k("attention.output_group_count"), u32v(self.o_groups)),
            (k("attention.sliding_window"), u32v(self.window)),
            (k("attention.compress_ratios"), Value::Array(ratios)),
            (k("attention.compress_rope_freq_base"), f(self.compress_rope_theta)),
            (k("attention.layer_norm_rms_epsilon"), f(self.rms_eps)),
            (k("attention.indexer.head_count"), u32v(self.idx_heads)),
            (k("attention.indexer.key_length"), u32v(self.idx_dim)),
            (k("attention.indexer.top_k"), u32v(self.idx_topk)),
            (k("rope.dimension_count"), u32v(self.rope_dim)),
            (k("rope.freq_base"), f(self.rope_theta)),
            (k("rope.scaling.type"), Value::String("yarn".into())),
            (k("rope.scaling.factor"), f(self.rope_factor)),
            (k("rope.scaling.original_context_length"), Value::U32(self.original_ctx.min(u32::MAX as u64) as u32)),
            (k("rope.scaling.yarn_beta_fast"), f(self.beta_fast)),
            (k("rope.scaling.yarn_beta_slow"), f(self.beta_slow)),
            (k("expert_count"), u32v(self.n_experts)),
            (k("expert_used_count"), u32v(self.n_used)),
            (k("expert_shared_count"), u32v(self.n_shared)),
            (k("expert_feed_forward_length"), u32v(self.inter)),
            (k("expert_weights_scale"), f(self.route_scale)),
            (k("expert_weights_norm"), Value::Bool(self.norm_topk)),
            (k("expert_gating_func"), Value::U32(4)),
            (k("hash_layer_count"), u32v(self.n_hash)),
            (k("swiglu_clamp_exp"), Value::Array(vec![f(self.swiglu_limit); self.n_layers])),
            (k("hyper_connection.count"), u32v(self.hc)),
            (k("hyper_connection.sinkhorn_iterations"), u32v(self.sinkhorn)),
            (k("hyper_connection.epsilon"), f(self.hc_eps)),
        ]
    }
}

/// The ordered tensor plan (main model, then `mtp.0.*`).
pub fn build_plan(c: &ModelConfig, recipe: Recipe) -> Vec<PlanItem> {
    let mut items = Vec::new();
    let d = c.dim as u64;
    let hc = c.hc as u64;
    let mix = (2 + hc) * hc;
    let mut add = |name: String, ne: Vec<u64>, role: Role, source: Source, mtp: bool| {
        let ty = gguf_type(recipe, role);
        items.push(PlanItem { spec: TensorSpec { name, ty, ne }, role, source, mtp });
    };
    let m = |s: &str| Source::Matrix(s.to_string());
    add("token_embd.weight".into(), vec![d, c.vocab as u64], Role::Embed, m("embed.weight"), false);
    let block = |add: &mut dyn FnMut(String, Vec<u64>, Role, Source, bool), g: &str, h: &str, ratio: usize, hash: bool, mtp: bool| {
        let hd = c.head_dim as u64;
        let ql = c.q_lora as u64;
        let gn = |s: &str| format!("{g}{s}");
        let hn = |s: &str| Source::Matrix(format!("{h}{s}"));
        add(gn("hc_attn_fn.weight"), vec![hc * d, mix], Role::F16Matrix, hn("hc_attn_fn"), mtp);
        add(gn("hc_attn_scale.weight"), vec![3], Role::Vector, hn("hc_attn_scale"), mtp);
        add(gn("hc_attn_base.weight"), vec![mix], Role::Vector, hn("hc_attn_base"), mtp);
        add(gn("attn_norm.weight"), vec![d], Role::Vector, hn("attn_norm.weight"), mtp);
        add(gn("attn_q_a.weight"), vec![d, ql], Role::Q8Matrix, hn("attn.wq_a.weight"), mtp);
        add(gn("attn_q_a_norm.weight"), vec![ql], Role::Vector, hn("attn.q_norm.weight"), mtp);
        add(gn("attn_q_b.weight"), vec![ql, c.n_heads as u64 * hd], Role::Q8Matrix, hn("attn.wq_b.weight"), mtp);
        add(gn("attn_kv.weight"), vec![d, hd], Role::Q8Matrix, hn("attn.wkv.weight"), mtp);
        add(gn("attn_kv_a_norm.weight"), vec![hd], Role::Vector, hn("attn.kv_norm.weight"), mtp);
        add(gn("attn_sinks.weight"), vec![c.n_heads as u64], Role::Vector, hn("attn.attn_sink"), mtp);
        let og = c.o_groups as u64;
        add(gn("attn_output_a.weight"), vec![c.n_heads as u64 * hd / og, og * c.o_lora as u64], Role::Q8Matrix, hn("attn.wo_a.weight"), mtp);
        add(gn("attn_output_b.weight"), vec![og * c.o_lora as u64, d], Role::Q8Matrix, hn("attn.wo_b.weight"), mtp);
        if ratio != 0 {
            let coff = if ratio == 4 { 2 } else { 1 };
            add(gn("attn_compressor_ape.weight"), vec![coff * hd, ratio as u64], Role::F16Matrix, hn("attn.compressor.ape"), mtp);
            add(gn("attn_compressor_kv.weight"), vec![d, coff * hd], Role::F16Matrix, hn("attn.compressor.wkv.weight"), mtp);
            add(gn("attn_compressor_gate.weight"), vec![d, coff * hd], Role::F16Matrix, hn("attn.compressor.wgate.weight"), mtp);
            add(gn("attn_compressor_norm.weight"), vec![hd], Role::Vector, hn("attn.compressor.norm.weight"), mtp);
        }
        if ratio == 4 {
            let ih = c.idx_heads as u64;
            let id = c.idx_dim as u64;
            add(gn("indexer.attn_q_b.weight"), vec![ql, ih * id], Role::F16Matrix, hn("attn.indexer.wq_b.weight"), mtp);
            add(gn("indexer.proj.weight"), vec![d, ih], Role::F16Matrix, hn("attn.indexer.weights_proj.weight"), mtp);
            add(gn("indexer_compressor_ape.weight"), vec![2 * id, 4], Role::F16Matrix, hn("attn.indexer.compressor.ape"), mtp);
            add(gn("indexer_compressor_kv.weight"), vec![d, 2 * id], Role::F16Matrix, hn("attn.indexer.compressor.wkv.weight"), mtp);
            add(gn("indexer_compressor_gate.weight"), vec![d, 2 * id], Role::F16Matrix, hn("attn.indexer.compressor.wgate.weight"), mtp);
            add(gn("indexer_compressor_norm.weight"), vec![id], Role::Vector, hn("attn.indexer.compressor.norm.weight"), mtp);
        }
        add(gn("hc_ffn_fn.weight"), vec![hc * d, mix], Role::F16Matrix, hn("hc_ffn_fn"), mtp);
        add(gn("hc_ffn_scale.weight"), vec![3], Role::Vector, hn("hc_ffn_scale"), mtp);
        add(gn("hc_ffn_base.weight"), vec![mix], Role::Vector, hn("hc_ffn_base"), mtp);
        add(gn("ffn_norm.weight"), vec![d], Role::Vector, hn("ffn_norm.weight"), mtp);
        let ne = c.n_experts as u64;
        let inter = c.inter as u64;
        add(gn("ffn_gate_inp.weight"), vec![d, ne], Role::F16Matrix, hn("ffn.gate.weight"), mtp);
        if !hash {
            add(gn("exp_probs_b.bias"), vec![ne], Role::Vector, hn("ffn.gate.bias"), mtp);
        }
        let ex = |w: &'static str| Source::Experts { prefix: format!("{h}ffn.experts"), w, n: c.n_experts };
        add(gn("ffn_gate_exps.weight"), vec![d, inter, ne], Role::RoutedGateUp, ex("w1"), mtp);
        add(gn("ffn_up_exps.weight"), vec![d, inter, ne], Role::RoutedGateUp, ex("w3"), mtp);
        add(gn("ffn_down_exps.weight"), vec![inter, d, ne], Role::RoutedDown, ex("w2"), mtp);
        let si = inter * c.n_shared as u64;
        add(gn("ffn_gate_shexp.weight"), vec![d, si], Role::Q8Matrix, hn("ffn.shared_experts.w1.weight"), mtp);
        add(gn("ffn_up_shexp.weight"), vec![d, si], Role::Q8Matrix, hn("ffn.shared_experts.w3.weight"), mtp);
        add(gn("ffn_down_shexp.weight"), vec![si, d], Role::Q8Matrix, hn("ffn.shared_experts.w2.weight"), mtp);
        if hash {
            add(gn("ffn_gate_tid2eid.weight"), vec![c.n_used as u64, c.vocab as u64], Role::Tid2eid, Source::Tid2eid(format!("{h}ffn.gate.tid2eid")), mtp);
        }
    };
    for l in 0..c.n_layers {
        block(&mut add, &format!("blk.{l}."), &format!("layers.{l}."), c.ratio(l), l < c.n_hash, false);
    }
    add("output_hc_base.weight".into(), vec![hc], Role::Vector, m("hc_head_base"), false);
    add("output_hc_fn.weight".into(), vec![hc * d, hc], Role::F16Matrix, m("hc_head_fn"), false);
    add("output_hc_scale.weight".into(), vec![1], Role::Vector, m("hc_head_scale"), false);
    add("output_norm.weight".into(), vec![d], Role::Vector, m("norm.weight"), false);
    add("output.weight".into(), vec![d, c.vocab as u64], Role::Output, m("head.weight"), false);
    for t in 0..c.n_mtp {
        let g = format!("mtp.{t}.");
        let mm = |s: &str| Source::Matrix(format!("mtp.{t}.{s}"));
        add(format!("{g}hc_head_base.weight"), vec![hc], Role::Vector, mm("hc_head_base"), true);
        add(format!("{g}hc_head_fn.weight"), vec![hc * d, hc], Role::F16Matrix, mm("hc_head_fn"), true);
        add(format!("{g}hc_head_scale.weight"), vec![1], Role::Vector, mm("hc_head_scale"), true);
        add(format!("{g}e_proj.weight"), vec![d, d], Role::Q8Matrix, mm("e_proj.weight"), true);
        add(format!("{g}h_proj.weight"), vec![d, d], Role::Q8Matrix, mm("h_proj.weight"), true);
        add(format!("{g}enorm.weight"), vec![d], Role::Vector, mm("enorm.weight"), true);
        add(format!("{g}hnorm.weight"), vec![d], Role::Vector, mm("hnorm.weight"), true);
        add(format!("{g}norm.weight"), vec![d], Role::Vector, mm("norm.weight"), true);
        block(&mut add, &g, &g, c.ratio(c.n_layers + t), false, true);
    }
    items
}
