//! Soft labels through the whole product: `distill serve` makes the fixture model a teacher,
//! `distill gen-data` captures its top-k log-probabilities into soft/, and the same model run
//! locally, teacher-forced over the same context, must give the same top-k.

use burn::backend::Flex;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use distill_data::soft::{SoftLabels, soft_dir};
use distill_hf::tokenizer::TextTokenizer;
use distill_models::CausalLm;

use super::*;

/// Starts `distill serve` on a free port; returns it and its base URL (`http://.../v1`).
pub(super) fn serve(model: &Path) -> (super::serve::Served, String) {
    let mut server = super::serve::start(model);
    let lines = server.stdout.take().unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let url = server.url.clone();
    (server, url)
}

#[test]
fn served_top_logprobs_captured_by_gen_data_equal_local_teacher_forcing() {
    let model_dir = fixtures().join("tiny-qwen2");
    let (_server, url) = serve(&model_dir);
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"question\": \"What is 2+3?\", \"answer\": \"5\"}\n{\"question\": \"Name a prime number.\", \"answer\": \"7\"}\n\
         {\"question\": \"What is 10-4?\", \"answer\": \"6\"}\n{\"question\": \"Is 9 odd?\", \"answer\": \"yes\"}\n",
    )
    .unwrap();
    let dataset = tmp.path().join("out");
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"roundtrip\"\n[teacher]\nmodel = \"tiny-qwen2\"\nbase_url = \"{url}\"\napi_key_env = \"\"\n\
             [student]\nmodel = {:?}\n[data]\nprompts = {:?}\ndataset = {:?}\n\
             [gen]\nmax_tokens = 64\ntemperature = 0.0\nrequest_timeout_s = 60\nmax_retries = 0\n\
             [soft_labels]\nenabled = true\nk = 5\n",
            model_dir.to_str().unwrap(),
            prompts.to_str().unwrap(),
            dataset.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = distill(&["gen-data", "--recipe", recipe.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let store = SoftLabels::open(&soft_dir(&dataset)).unwrap();
    let samples = distill_data::shards::read_samples(&dataset).unwrap();
    let errors = std::fs::read_to_string(dataset.join("errors.jsonl")).unwrap_or_default();
    assert_eq!(samples.len(), 4, "gen-data: {}\nerrors: {errors}", stdout(&o));
    let tokenizer = TextTokenizer::from_dir(&model_dir).unwrap();
    let model = CausalLm::<Flex>::load(&model_dir, &Default::default()).unwrap();
    let v = model.config.vocab_size;
    let mut compared = 0;
    for s in &samples {
        let rec = store.get(&s.key).unwrap().expect("every sample has soft labels");
        assert!(!rec.is_empty());
        // The context the server generated in: the prompt with the generation prompt, then
        // the generated tokens (the record's ids re-tokenize the generated text).
        let prompt = tokenizer
            .encode_chat(&s.messages[..s.messages.len() - 1], true)
            .unwrap();
        let ids: Vec<i64> = prompt.iter().chain(&rec.ids).map(|&t| i64::from(t)).collect();
        let n = ids.len();
        let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
        let logits = model.forward(x).narrow(2, 0, v); // [1, T, V]
        let logp: Vec<f32> = log_softmax(logits, 2).into_data().into_vec().unwrap();
        // Positions whose whole prefix carried over: there the re-tokenized ids are the ids
        // the server generated, so the local context is the server's.
        for t in 0..rec.len() {
            let (top_ids, top_lp) = rec.position(t);
            if top_ids[0] == distill_data::soft::PAD_ID {
                break;
            }
            // Position t is predicted from the token before it.
            let row = &logp[(prompt.len() + t - 1) * v..(prompt.len() + t) * v];
            for (&id, &lp) in top_ids
                .iter()
                .zip(top_lp)
                .filter(|(id, _)| **id != distill_data::soft::PAD_ID)
            {
                let local = row[id as usize];
                assert!(
                    (lp - local).abs() < 5e-3,
                    "sample {} position {t} id {id}: served {lp} vs local {local}",
                    s.key
                );
            }
            // And they are the local top-k: nothing outside them beats the k-th.
            let kth = top_lp
                .iter()
                .copied()
                .filter(|l| l.is_finite())
                .fold(f32::INFINITY, f32::min);
            let better = row.iter().filter(|&&l| l > kth + 5e-3).count();
            assert!(
                better < top_ids.len(),
                "position {t}: {better} local tokens beat the served k-th"
            );
            compared += 1;
        }
    }
    // A random-weight model samples mostly non-canonical token sequences, which the capture
    // leaves without soft labels (the student would tokenize that text differently); the
    // positions that do carry over are compared in full.
    assert!(
        compared >= 5,
        "only {compared} positions compared; gen-data said: {}",
        stdout(&o)
    );
}
