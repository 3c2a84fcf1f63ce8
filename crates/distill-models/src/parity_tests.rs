//! Logits parity with transformers on the fixture models: full-sequence forward, KV-cache
//! decoding, and greedy continuations. The references come from make_fixtures.py.

use burn::tensor::{Int, Tensor, TensorData};

use crate::CausalLm;
use crate::test_util::{RefTensor, read_reference};
use distill_kernels::Kernels;

/// Largest |a - b| and the reference's largest |b|.
fn max_diff(ours: &[f32], theirs: &[f64]) -> (f64, f64) {
    assert_eq!(ours.len(), theirs.len(), "length mismatch");
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f64::max);
    (diff, scale)
}

fn ids<B: Kernels>(tokens: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(tokens.to_vec(), [1, tokens.len()]), device)
}

fn logits_vec<B: Kernels>(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn tokens(r: &RefTensor) -> Vec<i64> {
    r.data.iter().map(|&x| x as i64).collect()
}

/// Checks one fixture model on backend B with absolute tolerance `tol`.
pub fn check_model<B: Kernels>(name: &str, device: &B::Device, tol: f64) {
    let dir = crate::test_util::fixtures().join(name);
    let model = CausalLm::<B>::load(&dir, device).unwrap();
    let refs = read_reference(name);
    let vocab = model.config.vocab_size;
    let mut seq = 0;
    while let Some(input) = refs.get(&format!("seq{seq}.input_ids")) {
        let expected = &refs[&format!("seq{seq}.logits")];
        let input = tokens(input);
        assert_eq!(expected.shape, vec![input.len(), vocab]);

        let full = logits_vec(model.forward(ids::<B>(&input, device)));
        let (diff, scale) = max_diff(&full, &expected.data);
        assert!(scale > 0.05, "{name} seq{seq}: reference logits are degenerate");
        eprintln!(
            "{name} seq{seq} ({} tokens): full forward max |diff| {diff:.2e} (logit scale {scale:.2})",
            input.len()
        );
        assert!(
            diff <= tol,
            "{name} seq{seq} full forward: max |diff| {diff:e} > {tol:e}"
        );

        // KV cache: a 3-token prefill, then one token at a time.
        let mut cache = model.new_cache();
        let split = 3.min(input.len());
        let mut cached = logits_vec(model.forward_cached(ids::<B>(&input[..split], device), &mut cache));
        for &tok in &input[split..] {
            cached.extend(logits_vec(
                model.forward_cached(ids::<B>(&[tok], device), &mut cache),
            ));
        }
        assert_eq!(cache.len(), input.len());
        let (diff, _) = max_diff(&cached, &expected.data);
        eprintln!("{name} seq{seq}: KV-cache decode max |diff| {diff:.2e}");
        assert!(
            diff <= tol,
            "{name} seq{seq} cached decode: max |diff| {diff:e} > {tol:e}"
        );
        seq += 1;
    }
    assert!(seq >= 2, "{name}: reference holds too few sequences");

    let prompt = tokens(&refs["greedy.prompt"]);
    let expected = tokens(&refs["greedy.output"]);
    let mut cache = model.new_cache();
    let mut input = prompt;
    let mut out = Vec::new();
    for _ in 0..expected.len() {
        let logits = model.forward_cached(ids::<B>(&input, device), &mut cache);
        let t = logits.dims()[1];
        let next: i64 = logits
            .narrow(1, t - 1, 1)
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .unwrap()[0];
        out.push(next);
        input = vec![next];
    }
    assert_eq!(
        out, expected,
        "{name}: greedy continuation differs from transformers"
    );
}

/// Two reference sequences packed into one row must give each one's own logits.
#[test]
fn packed_rows_do_not_leak_between_documents() {
    type B = burn::backend::Flex;
    let device = Default::default();
    let model = CausalLm::<B>::load(&crate::test_util::fixtures().join("tiny-qwen2"), &device).unwrap();
    let refs = read_reference("tiny-qwen2");
    let (a, b) = (tokens(&refs["seq0.input_ids"]), tokens(&refs["seq1.input_ids"]));
    let row: Vec<i64> = a.iter().chain(&b).copied().collect();
    let docs = vec![
        a.iter()
            .map(|_| 0u32)
            .chain(b.iter().map(|_| 1u32))
            .collect::<Vec<_>>(),
    ];
    let logits = logits_vec(model.forward_packed(ids::<B>(&row, &device), &docs));
    let expected: Vec<f64> = refs["seq0.logits"]
        .data
        .iter()
        .chain(&refs["seq1.logits"].data)
        .copied()
        .collect();
    let (diff, _) = max_diff(&logits, &expected);
    assert!(
        diff <= 1e-4,
        "packed forward leaks across documents: max |diff| {diff:e}"
    );
}

#[test]
fn qwen2_matches_transformers_on_cpu() {
    check_model::<burn::backend::Flex>("tiny-qwen2", &Default::default(), 1e-4);
}

#[test]
fn llama_matches_transformers_on_cpu() {
    check_model::<burn::backend::Flex>("tiny-llama", &Default::default(), 1e-4);
}

/// Runs on the GPU machine: `DISTILL_REQUIRE_GPU=1 cargo test -p distill-models --features
/// cuda cuda_` (without a CUDA device it prints SKIPPED and passes, or fails under
/// `DISTILL_REQUIRE_GPU=1`). bf16 keeps ~3 significant digits, so the bound is loose; greedy
/// tokens must still agree.
#[cfg(feature = "cuda")]
#[test]
fn cuda_bf16_matches_transformers() {
    let Some(device) = distill_kernels::cuda::stream::first_cuda_device() else {
        return;
    };
    for name in ["tiny-qwen2", "tiny-llama"] {
        check_model::<burn::backend::Cuda<half::bf16>>(name, &device, 3e-2);
    }
}
