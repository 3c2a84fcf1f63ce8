use burn::backend::Flex;
use distill_core::testing::{fixtures, snapshot, tiny_train_recipe as recipe};

use std::path::Path;

use distill_models::CausalLm;

use super::*;
use crate::checkpoint::{HostTensors, TrainState};

/// Training runs seed the backend's global generator (dropout); tests running side by side
/// would draw from it in between, so they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Options of a test run: nothing drawn.
fn silent(resume: bool, stop_after: Option<usize>) -> TrainOptions<'static> {
    TrainOptions {
        resume,
        stop_after,
        progress: &distill_core::progress::Silent,
    }
}

fn run(r: &Recipe, resume: bool, stop_after: Option<usize>) -> TrainReport {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    train::<Flex>(r, Default::default(), &silent(resume, stop_after)).unwrap()
}

/// The members of a data-parallel group of `world` threads of this process on the CPU,
/// summing through host memory.
fn local_members(world: usize) -> Vec<Box<dyn crate::parallel::Collective<Flex>>> {
    crate::parallel::LocalGroup::new(world)
        .into_iter()
        .map(|m| Box::new(m) as Box<dyn crate::parallel::Collective<Flex>>)
        .collect()
}

#[test]
fn full_finetune_loss_decreases_and_exports() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe(
        out.path(),
        &[
            "lora.enabled=false",
            "train.max_steps=12",
            "train.lr=3e-3",
            "train.recompute=false",
        ],
    );
    let report = run(&r, false, None);
    assert_eq!(report.steps, 12);
    assert_eq!(
        report.stats.skipped_truncated_generation, 3,
        "every 16th fixture sample is cut off"
    );
    let first: f64 = report.losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = report.losses[9..].iter().sum::<f64>() / 3.0;
    assert!(last < first * 0.9, "loss did not fall: {:?}", report.losses);
    let export = report.export.unwrap();
    let reloaded = CausalLm::<Flex>::load(&export, &Default::default()).unwrap();
    assert_eq!(reloaded.config.vocab_size, 384);
    assert!(report.run_dir.join("metrics.jsonl").exists() && report.run_dir.join("curves.png").exists());
}

/// QLoRA: the base's linear layers in NF4 on the device. It trains, starts near the dense
/// LoRA run (only the base's rounding differs), and the export merges the adapters into
/// the base as stored on disk, not into its 4-bit rounding.
#[test]
fn qlora_trains_on_an_nf4_base_and_exports_the_full_precision_merge() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["train.max_steps=12", "train.lr=1e-2", "train.recompute=true"];
    let r = recipe(a.path(), &[&extra[..], &["lora.quantize=\"nf4\""]].concat());
    let qlora = run(&r, false, None);
    let dense = run(&recipe(b.path(), &extra), false, None);
    // LoRA on the tiny random model learns slowly (5.89 -> 5.83 over 12 steps); QLoRA
    // follows the dense run step for step, but not bit for bit.
    assert!(qlora.losses[0] != dense.losses[0], "the base was not quantized");
    for (q, d) in qlora.losses.iter().zip(&dense.losses) {
        assert!(
            (q - d).abs() < 0.005 * d,
            "{:?} vs {:?}",
            qlora.losses,
            dense.losses
        );
    }
    let first: f64 = qlora.losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = qlora.losses[9..].iter().sum::<f64>() / 3.0;
    assert!(last < first - 0.03, "loss did not fall: {:?}", qlora.losses);

    // The merge, from the base's files and the PEFT adapter: W + (alpha / r) B A.
    let read = |path: PathBuf| -> HostTensors {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| {
                let data = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                (name, (v.shape().to_vec(), data))
            })
            .collect()
    };
    let export = qlora.export.unwrap();
    let merged = read(export.join("model.safetensors"));
    let base = read(fixtures().join("tiny-qwen2/model.safetensors"));
    let adapter = read(run_root(&r).join("adapter/adapter_model.safetensors"));
    let scale = (r.lora.alpha / r.lora.r as f64) as f32;
    let name = "model.layers.1.mlp.down_proj";
    let peft = |f: &str| &adapter[&format!("base_model.model.{name}.lora_{f}.weight")];
    let ((_, a), (b_shape, b)) = (peft("A"), peft("B")); // [r, in], [out, r]
    let (w_shape, w) = &base[&format!("{name}.weight")];
    let (rank, d_in) = (b_shape[1], w_shape[1]);
    let got = &merged[&format!("{name}.weight")].1;
    let mut moved = 0f32;
    for (k, (w, got)) in w.iter().zip(got).enumerate() {
        let (o, i) = (k / d_in, k % d_in);
        let delta: f32 = (0..rank).map(|j| b[o * rank + j] * a[j * d_in + i]).sum();
        assert!(
            (w + scale * delta - got).abs() < 1e-5,
            "{name}[{o}, {i}]: {got} vs {w} + {delta}"
        );
        moved = moved.max(delta.abs());
    }
    assert!(moved > 1e-4, "the adapter trained");
}

#[test]
fn recompute_gives_the_same_steps_as_keeping_graphs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let keep = run(
        &recipe(a.path(), &["train.max_steps=3", "train.recompute=false"]),
        false,
        None,
    );
    let redo = run(
        &recipe(b.path(), &["train.max_steps=3", "train.recompute=true"]),
        false,
        None,
    );
    for (x, y) in keep.losses.iter().zip(&redo.losses) {
        assert!((x - y).abs() < 1e-6, "{:?} vs {:?}", keep.losses, redo.losses);
    }
}

/// The losses of three steps at a high learning rate with `extra` set, checked to have moved
/// (so later losses check the gradients of the steps before them).
fn three_steps(extra: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let losses = run(
        &recipe(dir.path(), &["train.max_steps=3", "train.lr=1e-2", extra]),
        false,
        None,
    )
    .losses;
    assert_eq!(losses.len(), 3);
    assert!((losses[0] - losses[2]).abs() > 1e-3, "{extra}: {losses:?}");
    losses
}

#[test]
fn the_mlp_over_token_chunks_gives_the_same_steps_as_over_all_tokens() {
    let whole = three_steps("train.mlp_chunk_tokens=0");
    // 100 does not divide a micro-batch's 2 x 256 tokens: the last chunk is a short one.
    let chunked = three_steps("train.mlp_chunk_tokens=100");
    for (x, y) in whole.iter().zip(&chunked) {
        assert!((x - y).abs() < 1e-5, "{whole:?} vs {chunked:?}");
    }
}

#[test]
fn keeping_every_nth_block_input_gives_the_same_steps() {
    // The tiny model has 2 blocks: 2 keeps the first block's input and recomputes the second's.
    let every_block = three_steps("train.block_inputs_every=1");
    assert_eq!(every_block, three_steps("train.block_inputs_every=2"));
    // Past the number of blocks: one kept input for all.
    assert_eq!(every_block, three_steps("train.block_inputs_every=5"));
}

#[test]
fn block_inputs_parked_in_host_memory_give_the_same_steps() {
    // The same bits come back, so the same steps.
    assert_eq!(
        three_steps("train.offload_block_inputs=false"),
        three_steps("train.offload_block_inputs=true")
    );
}

/// `r` trained by `world` data-parallel workers ([`local_members`]).
fn run_data_parallel(r: &Recipe, world: usize, resume: bool, stop_after: Option<usize>) -> TrainReport {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let devices = vec![Default::default(); world];
    train_data_parallel::<Flex>(r, devices, local_members(world), &silent(resume, stop_after)).unwrap()
}

/// A run stopped after step 4 (its checkpoint at step 3: step 4 is lost) and resumed ends
/// where the uninterrupted run `whole` does: its first three losses and the resumed call's,
/// each within `tol`.
fn assert_resumed(whole: &TrainReport, first: &TrainReport, rest: &TrainReport, tol: f64) {
    let resumed: Vec<f64> = first.losses[..3].iter().chain(&rest.losses).copied().collect();
    assert_eq!(resumed.len(), whole.losses.len());
    for (x, y) in whole.losses.iter().zip(&resumed) {
        assert!(
            (x - y).abs() < tol,
            "uninterrupted {:?}\nresumed       {resumed:?}",
            whole.losses
        );
    }
}

/// The trainable weights and AdamW moments a run's last checkpoint holds.
fn checkpointed(report: &TrainReport) -> (HostTensors, HostTensors) {
    let loaded = crate::checkpoint::load(report.checkpoint.as_ref().unwrap()).unwrap();
    (loaded.weights, loaded.moments)
}

/// Every tensor of `a` within `tol` of `b`'s, in absolute terms, or relative to the
/// tensor's largest magnitude when `relative`.
fn assert_close(what: &str, a: &HostTensors, b: &HostTensors, tol: f32, relative: bool) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, (shape, x)) in a {
        let (other_shape, y) = &b[name];
        assert_eq!(shape, other_shape, "{what} {name}");
        let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        let scale = if relative {
            x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
        } else {
            1.0
        };
        assert!(
            worst <= tol * scale,
            "{what} {name}: differs by {worst} (scale {scale})"
        );
    }
}

/// The `grad_norm` of each line of a run's metrics.jsonl.
fn grad_norms(report: &TrainReport) -> Vec<f64> {
    std::fs::read_to_string(report.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// The check of data parallelism: N workers, each on its share of every step's rows,
/// take the steps one worker takes on all of them (the sums differ only in the order of f32
/// additions). 3 workers share a step's 4 rows as 2, 1 and 1.
#[test]
fn data_parallel_workers_take_the_one_worker_steps() {
    for extra in [
        &["lora.dropout=0"][..],
        &["lora.enabled=false", "train.lr=3e-3", "train.recompute=false"][..],
    ] {
        let sets: Vec<&str> = ["train.max_steps=4", "train.lr=1e-2"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let one = run(&recipe(dir.path(), &sets), false, None);
        assert!(
            (one.losses[0] - one.losses[3]).abs() > 1e-3,
            "{extra:?}: {:?}",
            one.losses
        );
        let (weights, moments) = checkpointed(&one);
        for world in [2, 3] {
            let dir = tempfile::tempdir().unwrap();
            let many = run_data_parallel(&recipe(dir.path(), &sets), world, false, None);
            for (x, y) in one.losses.iter().zip(&many.losses) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "{extra:?}, {world} workers: {:?} vs {:?}",
                    one.losses,
                    many.losses
                );
            }
            // AdamW divides by the gradient's own scale, so the weights would hide a gradient
            // summed wrongly by a constant factor; the norms and the moments do not. Elements
            // whose gradient is float noise around 0 (k_proj's bias: softmax ignores it) move
            // by up to lr a step in either run, so the weights are compared to a tenth of a
            // percent of what 4 steps at lr 1e-2 can move them.
            let (w, m) = checkpointed(&many);
            assert_close(&format!("{extra:?} x{world} weights"), &weights, &w, 1e-4, false);
            assert_close(&format!("{extra:?} x{world} moments"), &moments, &m, 1e-3, true);
            // The first step starts from the same weights: its gradient differs only by the
            // order of additions. Later ones start from weights that differ as above.
            for (i, (x, y)) in grad_norms(&one).iter().zip(grad_norms(&many)).enumerate() {
                let tol = if i == 0 { 1e-6 } else { 1e-3 };
                assert!(
                    (x - y).abs() <= tol * x,
                    "{extra:?} x{world}: step {i}'s grad norm {x} vs {y}"
                );
            }
            // Written once: a metrics line per step, one export.
            let lines = std::fs::read_to_string(many.run_dir.join("metrics.jsonl")).unwrap();
            assert_eq!(lines.lines().count(), 4, "{lines}");
            assert!(many.export.unwrap().join("config.json").exists());
        }
    }
}

/// Checkpoints hold the whole state, so a run stopped on 2 workers resumes on 3 (or any
/// number) and ends where an uninterrupted one-worker run does.
#[test]
fn a_data_parallel_run_resumes_on_another_number_of_workers() {
    let extra = ["train.max_steps=6", "train.lr=1e-2", "lora.dropout=0"];
    let whole = run(&recipe(tempfile::tempdir().unwrap().path(), &extra), false, None);
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &extra);
    let first = run_data_parallel(&r, 2, false, Some(4)); // checkpoints at step 3; step 4 is lost
    let rest = run_data_parallel(&r, 3, true, None);
    assert_eq!(rest.steps, 6);
    assert_resumed(&whole, &first, &rest, 1e-5);
}

/// A step's rows must give every worker at least one.
#[test]
fn data_parallel_runs_it_cannot_share_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = |r: &Recipe, world: usize| {
        let devices = vec![Default::default(); world];
        train_data_parallel::<Flex>(r, devices, local_members(world), &silent(false, None))
            .unwrap_err()
            .to_string()
    };
    let e = err(&recipe(dir.path(), &[]), 5);
    assert!(
        e.contains("4 rows a step cannot be shared by 5 GPUs") && e.contains("grad_accum to at least 3"),
        "{e}"
    );
    assert!(
        !run_root(&recipe(dir.path(), &[])).exists(),
        "nothing was written"
    );
}

/// `train.offload_optimizer` parks AdamW's moments in host memory between updates: a run
/// with them parked, stopped after step 4 and resumed (its checkpoint at step 3 read from
/// host memory, its moments parked again at restore), ends where an uninterrupted run with
/// them on the device does: the same losses, weights and checkpointed moments. Full
/// fine-tuning, so that the norms' undecayed group is a second group.
#[test]
fn an_offloaded_optimizer_takes_the_device_steps_and_resumes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = |offload: bool| {
        [
            "train.max_steps=7".to_string(),
            "train.lr=3e-3".to_string(),
            "lora.enabled=false".to_string(),
            format!("train.offload_optimizer={offload}"),
        ]
    };
    let (on_device, parked) = (extra(false), extra(true));
    let whole = run(
        &recipe(a.path(), &on_device.each_ref().map(String::as_str)),
        false,
        None,
    );
    let r = recipe(b.path(), &parked.each_ref().map(String::as_str));
    let first = run(&r, false, Some(4));
    let rest = run(&r, true, None);
    assert_resumed(&whole, &first, &rest, 1e-6);
    let (w_dev, m_dev) = checkpointed(&whole);
    let (w_parked, m_parked) = checkpointed(&rest);
    assert!(!m_parked.is_empty(), "the parked moments were checkpointed");
    assert_close("weights", &w_dev, &w_parked, 1e-6, true);
    assert_close("moments", &m_dev, &m_parked, 1e-5, true);
}

#[test]
fn an_offloaded_optimizer_is_refused_with_several_workers() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &["train.offload_optimizer=true"]);
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let err = train_data_parallel::<Flex>(
        &r,
        vec![Default::default(); 2],
        local_members(2),
        &silent(false, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train.offload_optimizer works on one GPU"), "{err}");
}

#[test]
fn an_interrupted_and_resumed_run_matches_an_uninterrupted_one() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["train.max_steps=7", "train.lr=1e-3", "lora.dropout=0.1"];
    let whole = run(&recipe(a.path(), &extra), false, None);
    let r = recipe(b.path(), &extra);
    let first = run(&r, false, Some(4)); // checkpoints at step 3; steps 4 is lost on "crash"
    assert_eq!(first.steps, 4);
    assert!(first.export.is_none());
    let rest = run(&r, true, None);
    assert_eq!(rest.steps, 7);
    assert_resumed(&whole, &first, &rest, 1e-6);
    let adapter = run_root(&r).join("adapter");
    assert!(
        adapter.join("adapter_config.json").exists() && adapter.join("adapter_model.safetensors").exists()
    );
    // The time in steps carries over from the checkpoint: the resumed call's step 4 counts the
    // first call's steps 1-3 too, and the run's total is its last line's.
    let log = crate::metrics::read_metrics(&rest.run_dir.join("metrics.jsonl")).unwrap();
    let train_s = |l: &crate::metrics::MetricsRecord| l.extra["train_s"].as_f64().unwrap();
    let at_3 = train_s(log.iter().find(|l| l.step == 3).unwrap());
    let resumed: Vec<f64> = log.iter().rev().take(4).rev().map(train_s).collect();
    assert!(
        at_3 > 0.0 && resumed[0] > at_3,
        "step 3 at {at_3} s, resumed {resumed:?}"
    );
    assert!(resumed.windows(2).all(|w| w[1] > w[0]), "{resumed:?}");
    // (JSON's decimal round trip may move the last bit.)
    assert!(
        (resumed[3] - rest.train_seconds).abs() < 1e-9,
        "{resumed:?} vs {}",
        rest.train_seconds
    );
}

/// A mid-run export is the model at its step: under a constant schedule, the same file as the
/// final export of a run that stops there. LoRA, so that the merge is part of what is checked.
#[test]
fn mid_run_exports_are_the_model_at_their_step() {
    let out = tempfile::tempdir().unwrap();
    let recipe_for = |name: &str, steps: usize| {
        let (name, steps) = (format!("name={name:?}"), format!("train.max_steps={steps}"));
        recipe(
            out.path(),
            &[
                &name,
                &steps,
                "train.schedule=\"constant\"",
                "train.warmup_steps=0",
                "train.export_every=2",
            ],
        )
    };
    let long = run(&recipe_for("long", 5), false, None);
    let short = run(&recipe_for("short", 2), false, None);
    let exports = |r: &TrainReport| r.export.as_ref().unwrap().parent().unwrap().join("exports");
    let steps: Vec<String> = std::fs::read_dir(exports(&long))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        steps,
        ["step-2", "step-4"],
        "the last step's model is final/, not an export"
    );
    assert!(!exports(&short).exists());
    let weights = |dir: PathBuf| std::fs::read(dir.join(distill_hf::weights::SINGLE_FILE)).unwrap();
    assert!(
        weights(exports(&long).join("step-2")) == weights(short.export.clone().unwrap()),
        "exports/step-2 differs from a 2-step run's final/"
    );
    assert_ne!(
        weights(exports(&long).join("step-4")),
        weights(exports(&long).join("step-2"))
    );
    CausalLm::<Flex>::load(&exports(&long).join("step-4"), &Default::default()).unwrap();
}

#[test]
fn kd_from_a_local_teacher_reduces_the_divergence() {
    // With the teacher in bf16/f32 and in NF4: its rounded weights give other logits (the
    // first step's KL differs) and the student learns to match either.
    let mut first_kl = Vec::new();
    for quantize in ["none", "nf4"] {
        let out = tempfile::tempdir().unwrap();
        let teacher = fixtures().join("tiny-llama");
        let r = recipe(
            out.path(),
            &[
                &format!("teacher.local_model={:?}", teacher.to_str().unwrap()),
                &format!("teacher.local_quantize={quantize:?}"),
                "loss.kd_ratio=1.0",
                "loss.temperature=2.0",
                "lora.enabled=false",
                "train.max_steps=10",
                "train.lr=3e-3",
            ],
        );
        let report = run(&r, false, None);
        let log = crate::metrics::read_metrics(&report.run_dir.join("metrics.jsonl")).unwrap();
        let (first, last) = (log.first().unwrap().kl, log.last().unwrap().kl);
        assert!(
            first > 0.0 && last < first * 0.8,
            "{quantize}: KL {first} -> {last}"
        );
        first_kl.push(first);
    }
    let (dense, nf4) = (first_kl[0], first_kl[1]);
    assert!(
        dense != nf4 && (dense - nf4).abs() < 0.2 * dense,
        "first KL {dense} vs {nf4} (NF4)"
    );
}

fn on_policy_recipe(out: &Path, extra: &[&str]) -> Recipe {
    let teacher = fixtures().join("tiny-llama");
    let sets = [
        &[
            format!("teacher.local_model={:?}", teacher.to_str().unwrap()),
            "on_policy.share=1.0".to_string(),
            "on_policy.max_new_tokens=24".to_string(),
            "on_policy.temperature=1.0".to_string(),
            "lora.enabled=false".to_string(),
            "train.lr=3e-3".to_string(),
        ][..],
        &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..],
    ]
    .concat();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    recipe(out, &sets)
}

/// The student samples, the teacher grades: with either divergence, the per-token reverse
/// KL to the teacher on the student's own samples of held-out prompts falls.
#[test]
fn on_policy_distillation_lowers_the_held_out_reverse_kl() {
    for divergence in ["jsd", "sampled_reverse_kl"] {
        let out = tempfile::tempdir().unwrap();
        let r = on_policy_recipe(
            out.path(),
            &[
                &format!("on_policy.divergence={divergence:?}"),
                "on_policy.beta=1.0",
                "train.micro_batch=4",
                "train.grad_accum=4",
                "train.max_steps=12",
            ],
        );
        let report = run(&r, false, None);
        let op = report.on_policy.clone().unwrap();
        assert_eq!(op.steps, 12, "{divergence}");
        let (before, after) = (op.reverse_kl_before.unwrap(), op.reverse_kl_after.unwrap());
        eprintln!("{divergence}: held-out reverse KL {before} -> {after}");
        assert!(
            after < 0.8 * before,
            "{divergence}: held-out reverse KL {before} -> {after}"
        );
        let log = crate::metrics::read_metrics(&report.run_dir.join("metrics.jsonl")).unwrap();
        let line = &log[0].extra;
        assert_eq!(line["on_policy"], serde_json::Value::Bool(true));
        let len = line["sample_len"].as_f64().unwrap();
        assert!(len > 0.0 && len <= 24.0, "{line:?}");
        assert!(
            line.contains_key("gen_tokens_per_s") && line.contains_key("train_share"),
            "{line:?}"
        );
    }
}

/// A metrics line's sampling figures and split cover every step since the previous line:
/// with a buffer of two steps and a line every two, each line stands for one step that sampled
/// and one that did not, whichever of them is logged.
#[test]
fn on_policy_metrics_lines_count_the_sampling_of_every_step_they_stand_for() {
    let out = tempfile::tempdir().unwrap();
    let r = on_policy_recipe(
        out.path(),
        &[
            "on_policy.buffer_steps=2",
            "train.log_every=2",
            "train.max_steps=4",
        ],
    );
    let report = run(&r, false, None);
    let log = crate::metrics::read_metrics(&report.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(log.iter().map(|l| l.step).collect::<Vec<_>>(), [2, 4]);
    for line in &log {
        let x = |k: &str| line.extra[k].as_f64().unwrap_or_else(|| panic!("{k}: {line:?}"));
        assert!(x("gen_s") > 0.0 && x("gen_tokens_per_s") > 0.0, "{line:?}");
        let shares = x("gen_share") + x("score_share") + x("train_share");
        assert!((shares - 1.0).abs() < 1e-9 && x("gen_share") > 0.0, "{line:?}");
    }
}

/// Steps are drawn on-policy with probability `share`, the same draw on every run.
#[test]
fn on_policy_steps_follow_the_share() {
    for share in [0.0, 0.25, 0.5, 1.0] {
        let n = (0..4000)
            .filter(|&s| crate::on_policy::on_policy_step(7, share, s))
            .count();
        assert!(
            (n as f64 / 4000.0 - share).abs() < 0.03,
            "share {share}: {n} of 4000"
        );
    }
    let a: Vec<bool> = (0..50)
        .map(|s| crate::on_policy::on_policy_step(7, 0.5, s))
        .collect();
    let b: Vec<bool> = (0..50)
        .map(|s| crate::on_policy::on_policy_step(7, 0.5, s))
        .collect();
    assert_eq!(a, b);
}

/// On-policy steps on several workers: each samples its share of every step's requests (a
/// sample's seed is its own), trains on it, and a checkpoint in the middle of a buffer keeps
/// every worker's samples, so a run stopped on 2 workers resumes on 3 and ends where an
/// uninterrupted one-worker run does.
#[test]
fn data_parallel_on_policy_steps_are_the_one_worker_steps() {
    let extra = [
        "on_policy.buffer_steps=2",
        "on_policy.samples_per_prompt=2",
        "train.max_steps=5",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = run(&on_policy_recipe(a.path(), &extra), false, None);
    let r = on_policy_recipe(b.path(), &extra);
    let first = run_data_parallel(&r, 2, false, Some(4)); // checkpoint at step 3, mid-buffer
    assert!(
        run_root(&r)
            .join("step-3")
            .join(crate::on_policy::ROLLOUTS)
            .exists()
    );
    let rest = run_data_parallel(&r, 3, true, None);
    assert_resumed(&whole, &first, &rest, 1e-5);
}

/// A run stopped after a checkpoint that falls inside a buffer window (its samples were
/// drawn from older weights) resumes on the very samples it would have trained on, and
/// ends where the uninterrupted run ends; off-policy steps mixed in alike.
#[test]
fn an_interrupted_on_policy_run_resumes_to_the_same_losses() {
    let extra = [
        "on_policy.share=0.5",
        "on_policy.buffer_steps=2",
        "on_policy.samples_per_prompt=2",
        "train.max_steps=8",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = run(&on_policy_recipe(a.path(), &extra), false, None);
    let r = on_policy_recipe(b.path(), &extra);
    let first = run(&r, false, Some(4)); // checkpoint at step 3; step 4 is lost on "crash"
    let kept = run_root(&r).join("step-3").join(crate::on_policy::ROLLOUTS);
    let on: Vec<bool> = (0..3)
        .map(|s| crate::on_policy::on_policy_step(r.train.seed, 0.5, s))
        .collect();
    let k = on.iter().filter(|&&x| x).count();
    assert_eq!(
        kept.exists(),
        k % 2 == 1,
        "on-policy steps before the checkpoint: {on:?}"
    );
    let rest = run(&r, true, None);
    assert_resumed(&whole, &first, &rest, 1e-6);
    let mixed = whole.on_policy.unwrap().steps;
    assert!(mixed > 0 && mixed < 8, "{mixed} of 8 steps on-policy");
}

/// A run directory as a run leaves it: a checkpoint saved with `r`, logs, the recipe.
fn earlier_run(r: &Recipe, step: usize) -> PathBuf {
    let root = run_root(r);
    let state = TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        step,
        total_steps: 10,
        adam_t: step as u64,
        tokens_seen: 0,
        skipped_steps: 0,
        recipe_hash: r.hash(),
        tokenizer_sha256: "t".into(),
        train_seconds: 0.0,
    };
    let none = HostTensors::new();
    checkpoint::save(&root, &state, &none, &none, &r.to_toml(), &[], 2).unwrap();
    std::fs::create_dir_all(root.join("runs")).unwrap();
    std::fs::write(root.join("runs/metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    std::fs::write(root.join("recipe.toml"), r.to_toml()).unwrap();
    root
}

fn train_err(r: &Recipe, resume: bool) -> String {
    match train::<Flex>(r, Default::default(), &silent(resume, None)) {
        Ok(_) => panic!("trained; expected a refusal"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_fresh_run_over_an_earlier_one_is_refused_and_touches_nothing() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe(out.path(), &["train.max_steps=2"]);
    let root = earlier_run(&r, 1);
    let before = snapshot(out.path());
    let err = train_err(&r, false);
    assert!(
        err.contains(&format!("{} already holds a run", root.display()))
            && err.contains("step-1/")
            && err.contains("--resume")
            && err.contains("--set train.out=")
            && err.contains("--set name="),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(snapshot(out.path()), before);

    // Logs but no checkpoint (a run stopped before its first save): --resume is no way on.
    std::fs::remove_dir_all(root.join("step-1")).unwrap();
    let err = train_err(&r, false);
    assert!(err.contains("no checkpoint to resume; move it aside"), "{err}");
    let err = train_err(&r, true);
    assert!(
        err.contains("--resume: no checkpoint")
            && err.contains("it holds recipe.toml, runs/")
            && err.contains("move it aside"),
        "{err}"
    );
}

#[test]
fn resume_without_a_checkpoint_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe(out.path(), &["train.max_steps=2"]);
    let err = train_err(&r, true);
    assert!(
        err.contains(&format!(
            "no checkpoint (step-N/ with state.json) in {}",
            run_root(&r).display()
        )) && err.contains("nothing has been saved there")
            && err.contains("run without --resume"),
        "{err}"
    );
    assert!(!run_root(&r).exists(), "a refused run created its directory");
}

#[test]
fn resume_refuses_a_changed_recipe_except_the_allowed_keys() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe(out.path(), &["train.max_steps=4"]);
    let root = earlier_run(&r, 3);
    let before = snapshot(out.path());
    let changed = recipe(
        out.path(),
        &[
            "train.max_steps=8",
            "train.lr=5e-3",
            "lora.r=4",
            "train.log_every=2",
        ],
    );
    let err = train_err(&changed, true);
    assert!(
        err.contains(&root.join("step-3/recipe.toml").display().to_string())
            && err.contains("lora.r was 16, is 4; train.lr was 0.0001, is 0.005; HINT: set them back"),
        "{err}"
    );
    assert!(!err.contains("max_steps") && !err.contains("log_every"), "{err}");
    assert_eq!(snapshot(out.path()), before);

    // Only keys that may change: resumed from the newest checkpoint.
    let allowed = recipe(
        out.path(),
        &[
            "train.max_steps=8",
            "train.checkpoint_every=5",
            "train.keep_checkpoints=4",
            "train.log_every=2",
            "train.recompute=false",
            "loss.chunk_tokens=64",
            "gen.temperature=0.9",
            "eval.n=4",
        ],
    );
    assert_eq!(check_run_dir(&allowed, true).unwrap(), Some(root.join("step-3")));
}

#[test]
fn diverging_runs_stop_with_the_last_checkpoint_named() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe(
        out.path(),
        &[
            "lora.enabled=false",
            "train.max_steps=20",
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.max_grad_norm=0",
            "train.max_bad_steps=2",
            "train.checkpoint_every=1",
        ],
    );
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let err = train::<Flex>(&r, Default::default(), &silent(false, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite") && err.contains("step-"), "{err}");
    let kept = checkpoint::list(&run_root(&r));
    assert!(!kept.is_empty());
    checkpoint::load(&kept.last().unwrap().1).unwrap();
}

/// A worker whose share of a step carries no loss (every label ignored) has no gradients; it
/// still sums with the others (zeros in their place) and the update is one worker's.
#[test]
fn a_worker_whose_rows_carry_no_loss_keeps_in_step() {
    use crate::parallel::{Collective, LocalGroup, Solo};
    use crate::params::read_params;
    use distill_data::examples::Row;
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &["lora.dropout=0", "train.micro_batch=1"]);
    let device = Default::default();
    let student = CausalLm::<Ad<Flex>>::load(&fixtures().join("tiny-qwen2"), &device).unwrap();
    let model = trainable_student(student, &r, &device);
    let row = |seed: u32, loss: bool| {
        let ids: Vec<u32> = (0..65).map(|i| (i * 37 + seed * 11) % 300).collect();
        Row {
            input_ids: ids[..64].to_vec(),
            labels: ids[1..]
                .iter()
                .map(|&t| if loss { i64::from(t) } else { data::IGNORE })
                .collect(),
            docs: vec![0; 64],
            keys: vec![String::new()],
        }
    };
    // Three workers take one row each; the third's carries no loss.
    let rows = [row(1, true), row(2, true), row(3, false)];
    let loss_cfg = crate::loss::LossConfig::from_recipe(&r.loss, Some(384));
    // Each worker is given its share of the rows, as the trainer does.
    let step = |group: &dyn Collective<Flex>| {
        let mine = &rows[crate::parallel::shard(rows.len(), group.rank(), group.world())];
        let mut opt = new_optimizer(&model, &r.train);
        let (after, outcome) = optimizer_step(
            model.clone(),
            &mut opt,
            &Teacher::None,
            mine,
            &loss_cfg,
            &r,
            1e-2,
            &device,
            group,
            &mut no_phases,
        )
        .unwrap();
        (read_params(&after, |p| p.trainable), outcome)
    };
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (one, one_outcome) = step(&Solo);
    let members = LocalGroup::new(3);
    let each: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = members.iter().map(|m| s.spawn(|| step(m))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (params, outcome) in &each {
        assert!(
            (outcome.loss - one_outcome.loss).abs() < 1e-6,
            "{outcome:?} vs {one_outcome:?}"
        );
        assert!((outcome.grad_norm - one_outcome.grad_norm).abs() <= 1e-6 * one_outcome.grad_norm);
        assert_close("weights after the step", &one, params, 1e-5, false);
    }
}

/// A worker that panics (as a GPU out of memory does inside burn) releases the others, which
/// would otherwise wait for it forever, and the panic reaches the caller as it was.
#[test]
fn a_panicking_worker_stops_the_others_and_its_panic_goes_on() {
    use crate::parallel::{Collective, CollectiveError, LocalGroup};
    use burn::tensor::Tensor;
    /// Worker 1 panics at its fifth host sum (at the start of the second step).
    struct Fragile(LocalGroup, std::sync::atomic::AtomicUsize);
    impl Collective<Flex> for Fragile {
        fn rank(&self) -> usize {
            Collective::<Flex>::rank(&self.0)
        }
        fn world(&self) -> usize {
            Collective::<Flex>::world(&self.0)
        }
        fn all_reduce_sum(&self, x: Tensor<Flex, 1>) -> Result<Tensor<Flex, 1>, CollectiveError> {
            self.0.all_reduce_sum(x)
        }
        fn all_reduce_host(&self, xs: &[f64]) -> Result<Vec<f64>, CollectiveError> {
            let calls = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.rank() == 1 && calls == 4 {
                panic!("CUDA_ERROR_OUT_OF_MEMORY (simulated)");
            }
            Collective::<Flex>::all_reduce_host(&self.0, xs)
        }
        fn abort(&self, why: &str) {
            Collective::<Flex>::abort(&self.0, why)
        }
    }
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &["train.max_steps=4", "lora.dropout=0"]);
    let members = LocalGroup::new(2)
        .into_iter()
        .map(|m| Box::new(Fragile(m, Default::default())) as Box<dyn Collective<Flex>>)
        .collect();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_data_parallel::<Flex>(&r, vec![Default::default(); 2], members, &silent(false, None))
    }));
    let payload = caught.expect_err("the worker's panic goes on");
    let text = payload.downcast_ref::<&str>().copied().unwrap_or_default();
    assert_eq!(text, "CUDA_ERROR_OUT_OF_MEMORY (simulated)");
}

/// Trailing padding folded into a row's last document: rows of one document get a plain
/// causal mask (the flag cuDNN's attention needs), packed documents stay apart, and every
/// real token's hidden state is what it was with padding as a document of its own.
#[test]
fn padding_folded_into_the_last_document_changes_no_real_token() {
    let example = |n: usize, seed: u32| {
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + seed * 11) % 300).collect();
        data::example(
            ids[..n / 2].to_vec(),
            ids[n / 2..].to_vec(),
            format!("p{seed}"),
            format!("k{seed}"),
        )
    };
    let one = data::pack(&[example(20, 1)], 32, false, 0).remove(0);
    let two = data::pack(&[example(10, 2), example(12, 3)], 32, true, 0).remove(0);
    assert_eq!(one.docs[19..21], [0, 1], "the padding's own index");
    assert_eq!(step::attention_docs(&one), vec![0; 32]);
    let folded = step::attention_docs(&two);
    assert_eq!(folded[..22], two.docs[..22]);
    assert!(folded[22..].iter().all(|&d| d == 1), "{folded:?}");

    let device = Default::default();
    let student = CausalLm::<Flex>::load(&fixtures().join("tiny-qwen2"), &device).unwrap();
    let causal = |docs: &[u32]| {
        distill_models::transformer::Context::<Flex>::packed(&student.rotary, &[docs.to_vec()], &device)
            .keys
            .is_some_and(|k| k.causal)
    };
    assert!(causal(&step::attention_docs(&one)) && !causal(&one.docs));
    assert!(!causal(&folded));
    for (row, real) in [(&one, 20), (&two, 22)] {
        let ids = burn::tensor::Tensor::<Flex, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(row.input_ids.iter().map(|&x| i64::from(x)).collect(), [1, 32]),
            &device,
        );
        let hidden = |docs: Vec<u32>| -> Vec<f32> {
            let h = student.hidden_states_packed(ids.clone(), &[docs]); // [1, 32, C]
            let c = h.dims()[2];
            h.slice([0..1, 0..real, 0..c])
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap()
        };
        let (apart, folded) = (hidden(row.docs.clone()), hidden(step::attention_docs(row)));
        let worst = apart
            .iter()
            .zip(&folded)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-5, "real tokens moved by {worst}");
    }
}
