//! B5: the longest sequence at batch 1 whose training step stays under a memory cap, found
//! by probes in child processes.

use std::time::Instant;

use distill_core::recipe::{BaseQuant, LoraSection};
use distill_models::DecoderConfig;
use serde_json::{Value, json};

use crate::case::base_quant;
use crate::flops::{layer_matmul_params, lora_params, matmul_params};
use crate::parent::Parent;
use crate::plan::Case;
use crate::rows::{GIB, base_row, model_name};

impl Parent {
    /// B5: the longest sequence at batch 1 whose step stays under the cap. Doubles from
    /// --mem-start until a probe fails (over the cap, or out of memory), then bisects down to
    /// --mem-step; each probe is one child process.
    pub(crate) fn envelope(
        &self,
        i: usize,
        case: &Case,
        config: usize,
        c: &DecoderConfig,
    ) -> anyhow::Result<Value> {
        let a = &self.args;
        let started = Instant::now();
        let cap = a.mem_cap_gib;
        let mut probes: Vec<Value> = Vec::new();
        let (mut good, mut bad): (Option<(usize, Value)>, Option<usize>) = (None, None);
        let probe = |seq: usize, probes: &mut Vec<Value>| -> anyhow::Result<Option<Value>> {
            eprintln!("B5 probe: seq {seq}");
            let rows = self.child(i, case, Some(seq))?;
            let row = rows.into_iter().next().unwrap_or(Value::Null);
            let peak = row.get("peak_gib").and_then(Value::as_f64);
            let ok = row.get("error").is_none() && !row.is_null() && peak.is_none_or(|p| p <= cap);
            // Printed as it comes: a search stopped at a caller's time limit keeps its probes.
            eprintln!(
                "B5 probe: seq {seq} {} (peak {})",
                if ok { "fits" } else { "does not fit" },
                peak.map_or("unknown".into(), |p| format!("{p:.2} GiB"))
            );
            probes.push(json!({"seq": seq, "ok": ok, "peak_gib": peak}));
            Ok(ok.then_some(row))
        };
        let out_of_time = || started.elapsed().as_secs_f64() > a.mem_budget_s;
        let lora = a.mem_mode == "lora";
        let static_gib = static_train_bytes(c, lora.then_some(a.lora_r), base_quant(a, lora)) as f64 / GIB;
        let step = a.mem_step.max(1);
        let mut seq = a.mem_start.max(step);
        if static_gib > cap {
            // Weights, gradients and moments alone exceed the cap: one probe at the shortest
            // length measures by how much, and no length can fit.
            seq = step;
        }
        // Upward: double until a probe fails or the maximum passes.
        loop {
            match probe(seq, &mut probes)? {
                Some(row) => {
                    good = Some((seq, row));
                    if seq >= a.mem_max || out_of_time() {
                        break;
                    }
                    seq = (seq * 2).min(a.mem_max);
                }
                None => {
                    bad = Some(seq);
                    break;
                }
            }
        }
        // Downward when even the start failed.
        while good.is_none() && seq > step && static_gib <= cap && !out_of_time() {
            seq = (seq / 2).max(step) / step * step;
            match probe(seq, &mut probes)? {
                Some(row) => good = Some((seq, row)),
                None => bad = Some(seq),
            }
        }
        // Bisect between the longest good and the shortest bad.
        while let (Some((lo, _)), Some(hi)) = (&good, bad) {
            if hi - lo <= step || out_of_time() {
                break;
            }
            let mid = (lo + (hi - lo) / 2) / step * step;
            if mid <= *lo {
                break;
            }
            match probe(mid, &mut probes)? {
                Some(row) => good = Some((mid, row)),
                None => bad = Some(mid),
            }
        }
        let mut row = base_row(
            "B5",
            &model_name(&a.configs[config]),
            &format!(
                "{} bs1 under {cap} GiB",
                match (lora, base_quant(a, lora)) {
                    (true, BaseQuant::Nf4) => "qlora nf4",
                    (true, BaseQuant::None) => "lora",
                    (false, _) => "full",
                }
            ),
        );
        let resolved = match (&good, bad) {
            (Some((lo, _)), Some(hi)) => hi - lo <= step,
            (Some((lo, _)), None) => *lo >= a.mem_max,
            (None, _) => seq <= step || static_gib > cap,
        };
        row.insert("seq".into(), json!(good.as_ref().map(|(s, _)| *s).unwrap_or(0)));
        row.insert("first_failing_seq".into(), json!(bad));
        row.insert("resolved".into(), json!(resolved));
        row.insert("cap_gib".into(), json!(cap));
        row.insert("static_gib".into(), json!(static_gib));
        if let Some((_, best)) = &good {
            for key in [
                "peak_gib",
                "mem_method",
                "pool_gib",
                "tokens_per_s",
                "device",
                "config",
            ] {
                if let Some(v) = best.get(key) {
                    row.insert(key.into(), v.clone());
                }
            }
        }
        row.insert("probes".into(), Value::Array(probes));
        Ok(Value::Object(row))
    }
}

/// Weights, gradients and AdamW moments before any activation: bf16 frozen weights (the
/// decoder layers' at 4.5 bits in NF4) and f32 adapters (LoRA), or f32 master weights, f32
/// gradients and two f32 moments (full).
fn static_train_bytes(c: &DecoderConfig, lora_r: Option<usize>, quantize: BaseQuant) -> u64 {
    // matmul_params counts the head once; an untied model also stores the embeddings.
    let embed = (c.vocab_size * c.hidden_size) as u64;
    let params = matmul_params(c) + if c.tie_word_embeddings { 0 } else { embed };
    let layers = layer_matmul_params(c) * c.num_hidden_layers as u64;
    match lora_r {
        Some(r) => {
            let targets: Vec<String> = LoraSection::default().targets;
            let frozen = match quantize {
                BaseQuant::None => 2 * params,
                BaseQuant::Nf4 => 2 * (params - layers) + layers * 9 / 16,
            };
            frozen + 16 * lora_params(c, r, &targets)
        }
        None => 16 * params,
    }
}
