//! `distill gen-data --recipe R.toml`: the teacher answers every prompt `n` times; results land
//! in `<data.dataset>/samples-*.jsonl` as they arrive, failures in `errors.jsonl`, and
//! `manifest.json` says what the directory holds. Rerunning the same command resumes.
//! With `[soft_labels] enabled` (source "api-top-logprobs") the teacher's top-k logprobs go to
//! `soft/` as well (see [`soft_capture`]).

mod soft_capture;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use distill_core::Recipe;
use distill_data::soft::SoftSummary;
use distill_data::{ErrorRecord, PromptSpec, Sample, load_prompts};
use distill_hf::token_map::MappingStats;
use distill_teacher::api::{Sampling, request_body, request_logprobs};
use distill_teacher::fleet::{Fleet, FleetPolicy, endpoints, resolve_keys};
use distill_teacher::ledger::{Ledger, Peek, Totals};
use distill_teacher::manifest::{Manifest, ManifestInfo, RequestParams, write_manifest};
use distill_teacher::plan::{Job, Plan, RequestSetup, plan};
use distill_teacher::run::{Outcome, Prices, Progress, RunOptions, SampleHook, Stop, StopReason, pending};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use soft_capture::SoftCapture;

#[derive(clap::Args)]
pub struct Args {
    /// The recipe: [teacher], [data] and [gen] are read.
    #[arg(long, value_name = "FILE")]
    recipe: PathBuf,
    /// Override a recipe value (repeatable), e.g. `--set gen.n=4 --set data.max_prompts=100`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Send again the requests that errors.jsonl records as failed.
    #[arg(long)]
    retry_failed: bool,
    /// Stop cleanly once the dataset's estimated cost reaches this many USD (gen.max_cost).
    #[arg(long, value_name = "USD")]
    max_cost: Option<f64>,
    /// Stop cleanly once the dataset's prompt + completion tokens reach this (gen.max_tokens_total).
    #[arg(long, value_name = "TOKENS")]
    max_tokens: Option<u64>,
    /// Print what would be sent and what it would cost; send nothing, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Instead of querying the teacher: re-score the dataset's samples with a local teacher
    /// ([teacher] local_model, or --teacher) and write its top-k ([soft_labels] k) as soft
    /// labels in the student's token ids.
    #[arg(long)]
    rescore: bool,
    /// The local teacher for --rescore: an HF directory or `org/name[@rev]`.
    #[arg(long, value_name = "MODEL", requires = "rescore")]
    teacher: Option<String>,
}

pub fn run(args: Args, device: Option<crate::backend::DeviceArg>) -> anyhow::Result<()> {
    let mut overrides = args.set.clone();
    if let Some(c) = args.max_cost {
        overrides.push(format!("gen.max_cost={c:?}"));
    }
    if let Some(t) = args.max_tokens {
        overrides.push(format!("gen.max_tokens_total={t}"));
    }
    let recipe = Recipe::load(&args.recipe, &overrides)?;
    if args.rescore {
        return crate::rescore::run(&recipe, args.teacher, device);
    }
    soft_capture::check_source(&recipe)?;
    let g = &recipe.generation;
    let setup = RequestSetup {
        model: recipe.teacher.model.clone(),
        sampling: Sampling {
            temperature: g.temperature,
            top_p: g.top_p,
            max_tokens: g.max_tokens,
            stop: g.stop.clone(),
            seed: g.seed,
        },
        system_prompt: g.system_prompt.clone(),
        prompt_suffix: g.prompt_suffix.clone(),
        n: u32::try_from(g.n).context("[gen] n is too large")?,
    };
    let spec = PromptSpec {
        source: recipe.data.prompts.clone(),
        prompt_field: recipe.data.prompt_field.clone(),
        reference_field: recipe.data.reference_field.clone(),
        id_field: recipe.data.id_field.clone(),
        max_prompts: recipe.data.max_prompts,
    };
    let prompts = load_prompts(&spec, &distill_hf::hub::HubSettings::from_env())?;
    let plan = plan(&prompts, &setup);
    let endpoints = endpoints(&recipe);

    if args.dry_run {
        return dry_run(&recipe, &setup, &plan, &endpoints, prompts.len());
    }
    let (fleet_specs, keys) = resolve_keys(&endpoints)?;
    let dir = recipe.data.dataset.clone();
    let mut ledger = Ledger::open(&dir, keys.clone())?;
    let params = RequestParams::from(&setup);
    if let Some(old) = Manifest::read(&dir)? {
        old.check_same_requests(&dir, &params)?;
    }
    let mut soft = SoftCapture::open(&recipe)?;
    if let Some(s) = &soft {
        s.check_ledger(&dir, &plan.jobs, &ledger)?;
    }
    for (path, bytes) in &ledger.repairs().torn {
        println!(
            "gen-data: cut a torn last line ({bytes} bytes, a write cut off by a crash) off {}",
            path.display()
        );
    }
    let all_jobs = plan.jobs.clone();
    let (todo, done, failed) = pending(plan.jobs.clone(), &ledger, args.retry_failed);
    println!(
        "gen-data: {} prompts x {} = {} requests; {done} done, {} to send to {} endpoint(s){}",
        prompts.len() - plan.duplicate_prompts,
        setup.n,
        all_jobs.len(),
        todo.len(),
        fleet_specs.len(),
        if failed > 0 {
            format!("; {failed} failed earlier (--retry-failed sends them again)")
        } else {
            String::new()
        }
    );
    if plan.duplicate_prompts > 0 {
        println!(
            "gen-data: {} prompts repeat an earlier prompt's messages and are sent once",
            plan.duplicate_prompts
        );
    }

    let prices = Prices {
        prompt_per_m: recipe.teacher.price_prompt_per_m,
        cached_prompt_per_m: recipe.teacher.price_cached_prompt_per_m,
        completion_per_m: recipe.teacher.price_completion_per_m,
    };
    let opts = RunOptions {
        setup: setup.clone(),
        stream: g.stream,
        concurrency: g.concurrency,
        request_timeout: Duration::from_secs(g.request_timeout_s),
        connect_timeout: Duration::from_secs(10),
        max_retries: g.max_retries,
        backoff_base: Duration::from_secs_f64(g.retry_base_delay_s),
        backoff_max: Duration::from_secs_f64(g.retry_max_delay_s),
        max_retry_after: Duration::from_secs(600),
        prices,
        max_cost: g.max_cost,
        max_tokens: g.max_tokens_total,
        rejection_limit: 5,
        top_logprobs: soft.as_ref().map(|_| recipe.soft_labels.k),
    };
    let mut info = ManifestInfo {
        recipe: &recipe,
        params,
        endpoints: fleet_specs.iter().map(|e| e.base_url.clone()).collect(),
        prompts: prompts.len() - plan.duplicate_prompts,
        duplicates: plan.duplicate_prompts,
        prices,
        soft: soft.as_ref().map(|s| s.info(None)),
    };
    write_manifest(&info, &ledger, &all_jobs, "running")?;

    let fleet = Arc::new(Fleet::new(fleet_specs, FleetPolicy::default()));
    let bar = Arc::new(Bar::new(todo.len() as u64, prices, ledger.totals().clone()));
    let stop = Stop::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(async {
        let interrupt = stop.clone();
        let bar2 = bar.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                bar2.println("gen-data: stopping: finishing the requests in flight (Ctrl-C again to quit now; they are sent again next run)");
                interrupt.trigger();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let hook = soft.as_mut().map(|s| s as &mut dyn SampleHook);
        distill_teacher::run::run_with(todo, fleet, &mut ledger, &opts, bar.clone(), stop.clone(), hook).await
    })?;
    bar.finish();
    let soft_summary = match soft.take() {
        Some(s) => {
            let stats = *s.stats();
            let (summary, soft_info) = s.finish()?;
            info.soft = Some(soft_info);
            Some((summary, stats))
        }
        None => None,
    };
    let manifest = write_manifest(&info, &ledger, &all_jobs, outcome.stop.tag())?;
    print_summary(&dir, &manifest, &outcome, &recipe);
    if let Some((summary, stats)) = &soft_summary {
        print_soft_summary(&dir, summary, stats, recipe.soft_labels.k);
    }
    match outcome.stop {
        StopReason::PaymentRequired { endpoint, message } => bail!(
            "the teacher at {endpoint} answered {message} (insufficient balance): stopped cleanly with {} samples saved; top up, then rerun the same command to continue",
            manifest.counts.samples
        ),
        StopReason::Rejected {
            status,
            count,
            endpoint,
            message,
        } => {
            let key = match recipe.teacher.api_key_env.as_deref() {
                Some(var) if !var.is_empty() => format!(" and the key in ${var}"),
                _ => String::new(),
            };
            bail!(
                "{endpoint} rejected {count} requests in a row ({message}); check teacher.model, teacher.base_url{key} (status {status}); failures are in {}",
                dir.join("errors.jsonl").display()
            )
        }
        StopReason::Refused { message } => bail!("{message}"),
        _ => Ok(()),
    }
}

fn print_soft_summary(dir: &Path, s: &SoftSummary, stats: &MappingStats, k: usize) {
    println!(
        "  soft      {} samples, {} tokens, top-{k} at {:.1} bytes/token in {}; this run {} teacher tokens, {:.2}% did not carry over ({} unmapped, {} tokenized differently)",
        s.counts.samples,
        human(s.counts.tokens),
        s.bytes_per_token,
        distill_data::soft::soft_dir(dir).display(),
        human(stats.tokens),
        100.0 * stats.mismatch_rate(),
        stats.unmapped,
        stats.misaligned
    );
}

fn dry_run(
    recipe: &Recipe,
    setup: &RequestSetup,
    plan: &Plan,
    endpoints: &[(String, Option<String>)],
    prompt_count: usize,
) -> anyhow::Result<()> {
    let dir = &recipe.data.dataset;
    let peek = Peek::read(dir)?;
    let todo: Vec<&Job> = plan
        .jobs
        .iter()
        .filter(|j| !peek.done.contains(&j.key) && !peek.failed.contains(&j.key))
        .collect();
    let failed = plan.jobs.iter().filter(|j| peek.failed.contains(&j.key)).count();
    println!("dry run: nothing is sent and nothing written");
    println!(
        "recipe     {} (hash {})",
        recipe.source.display(),
        &recipe.hash()[..12]
    );
    println!("teacher    {}", setup.model);
    for (url, env) in endpoints {
        let key = match env {
            None => "no key".to_string(),
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => format!("key from ${var} (set)"),
                _ => format!("key from ${var} (NOT SET: export it before running)"),
            },
        };
        println!(
            "endpoint   {} ({key})",
            distill_teacher::api::completions_url(url)
        );
    }
    println!(
        "prompts    {prompt_count} from {}{}",
        recipe.data.prompts,
        if plan.duplicate_prompts > 0 {
            format!(" ({} repeats sent once)", plan.duplicate_prompts)
        } else {
            String::new()
        }
    );
    println!(
        "requests   {} ({} per prompt); {} done, {} failed earlier, {} to send",
        plan.jobs.len(),
        setup.n,
        plan.jobs.len() - todo.len() - failed,
        failed,
        todo.len()
    );
    println!("dataset    {}", dir.display());
    if let Some(first) = todo.first() {
        let mut body = request_body(
            &setup.model,
            &first.messages,
            &setup.sampling,
            first.sample_index,
            recipe.generation.stream,
        );
        if recipe.soft_labels.enabled {
            request_logprobs(&mut body, recipe.soft_labels.k);
        }
        println!(
            "first request (POST, key sent as an Authorization header):\n{}",
            serde_json::to_string_pretty(&body)?
        );
    }
    // Prompt tokens: about 4 characters a token (no tokenizer for a remote teacher).
    let prompt_tokens: u64 = todo
        .iter()
        .map(|j| {
            j.messages
                .iter()
                .map(|m| m.content.chars().count() as u64 / 4 + 4)
                .sum::<u64>()
        })
        .sum();
    let prices = Prices {
        prompt_per_m: recipe.teacher.price_prompt_per_m,
        cached_prompt_per_m: recipe.teacher.price_cached_prompt_per_m,
        completion_per_m: recipe.teacher.price_completion_per_m,
    };
    let upper = prices.cost(
        prompt_tokens,
        0,
        todo.len() as u64 * setup.sampling.max_tokens as u64,
    );
    if peek.totals.samples > 0 {
        let avg = peek.totals.completion_tokens as f64 / peek.totals.samples as f64;
        let est = prices.cost(prompt_tokens, 0, (avg * todo.len() as f64) as u64);
        println!(
            "estimate   ${est:.2} (~{} prompt tokens; {avg:.0} completion tokens a sample, as so far); at most ${upper:.2} if every answer runs to max_tokens",
            human(prompt_tokens)
        );
        println!(
            "spent      ${:.2} so far on {} samples",
            prices.cost_of(&peek.totals),
            peek.totals.samples
        );
    } else {
        println!(
            "estimate   at most ${upper:.2} (~{} prompt tokens + {} x max_tokens {}); once samples exist the estimate uses their average length",
            human(prompt_tokens),
            todo.len(),
            setup.sampling.max_tokens
        );
    }
    if let Some(c) = recipe.generation.max_cost {
        println!("budget     stops at ${c:.2}");
    }
    if let Some(t) = recipe.generation.max_tokens_total {
        println!("budget     stops at {} tokens", human(t));
    }
    Ok(())
}

fn print_summary(dir: &Path, m: &Manifest, o: &Outcome, recipe: &Recipe) {
    let c = &m.counts;
    let secs = o.elapsed.as_secs_f64().max(1e-3);
    let headline = match &o.stop {
        StopReason::Finished => "finished".to_string(),
        StopReason::MaxCost { spent, limit } => format!(
            "stopped at the cost budget (${spent:.4} of ${limit:.2}); raise --max-cost and rerun to continue"
        ),
        StopReason::MaxTokens { used, limit } => format!(
            "stopped at the token budget ({} of {}); raise --max-tokens and rerun to continue",
            human(*used),
            human(*limit)
        ),
        StopReason::PaymentRequired { .. } => "stopped: insufficient balance (402)".into(),
        StopReason::Rejected { .. } => "stopped: the teacher rejects requests".into(),
        StopReason::Interrupted => "interrupted; rerun the same command to continue".into(),
        StopReason::Refused { .. } => "stopped: soft labels refused".into(),
    };
    println!("gen-data {headline}: {}", dir.display());
    println!(
        "  requests  {} planned: {} samples, {} failed (errors.jsonl), {} pending",
        c.requests, c.samples, c.failed, c.pending
    );
    println!(
        "  this run  {} sent: {} samples, {} failed, {} retries, {} given up at the stop, in {:.1}s",
        o.started, o.succeeded, o.failed, o.retries, o.abandoned, secs
    );
    let correct = if c.with_reference > 0 {
        format!(
            "{}/{} correct ({:.1}%)",
            c.correct,
            c.with_reference,
            100.0 * c.correct as f64 / c.with_reference as f64
        )
    } else {
        "no references".into()
    };
    println!(
        "  quality   {} truncated; {correct}; {} kept for training (keep_truncated={}, keep_only_correct={})",
        c.truncated, c.kept, recipe.generation.keep_truncated, recipe.generation.keep_only_correct
    );
    println!(
        "  tokens    prompt {} ({} cached), completion {} (reasoning {})",
        human(m.usage.prompt_tokens),
        human(m.usage.cached_tokens),
        human(m.usage.completion_tokens),
        human(m.usage.reasoning_tokens)
    );
    println!("  cost      ${:.4} estimated over all runs", m.cost_usd);
}

fn human(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

/// The progress bar on a terminal (stderr); otherwise a line on stdout every 30 s, so that
/// stderr holds nothing but a final error.
struct Bar {
    bar: ProgressBar,
    tty: bool,
    t0: Instant,
    last_line: Mutex<Instant>,
    completion_tokens: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    prices: Prices,
    totals: Mutex<Totals>,
}

impl Bar {
    fn new(total: u64, prices: Prices, totals: Totals) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if tty {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Bar {
            bar,
            tty,
            t0: Instant::now(),
            last_line: Mutex::new(Instant::now()),
            completion_tokens: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            prices,
            totals: Mutex::new(totals),
        }
    }

    fn status(&self) -> String {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-3);
        let cost = self.prices.cost_of(&self.totals.lock().expect("totals"));
        format!(
            "{:.0} tok/s, {} failed, {} retries, ${cost:.2}",
            self.completion_tokens.load(Ordering::Relaxed) as f64 / secs,
            self.errors.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
        )
    }

    fn tick(&self) {
        let status = self.status();
        if self.tty {
            self.bar.set_message(status);
        } else {
            let mut last = self.last_line.lock().expect("last line");
            if last.elapsed() >= Duration::from_secs(30) {
                *last = Instant::now();
                println!(
                    "gen-data: {}/{} {status}",
                    self.bar.position(),
                    self.bar.length().unwrap_or(0)
                );
            }
        }
    }

    fn println(&self, msg: &str) {
        if self.tty {
            self.bar.println(msg);
        } else {
            println!("{msg}");
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn sample(&self, s: &Sample) {
        self.completion_tokens
            .fetch_add(s.usage.completion_tokens, Ordering::Relaxed);
        self.totals
            .lock()
            .expect("totals")
            .add(&s.usage, s.truncated, s.correct, &s.teacher_model);
        self.bar.inc(1);
        self.tick();
    }

    fn failure(&self, _e: &ErrorRecord) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.bar.inc(1);
        self.tick();
    }

    fn retry(&self, _endpoint: &str, _why: &str, _wait: Duration) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.tick();
    }

    fn stopping(&self, reason: &StopReason, in_flight: usize) {
        let why = match reason {
            StopReason::MaxCost { limit, .. } => format!("the cost budget (${limit:.2}) is reached"),
            StopReason::MaxTokens { limit, .. } => format!("the token budget ({}) is reached", human(*limit)),
            StopReason::PaymentRequired { endpoint, .. } => {
                format!("{endpoint} answered 402 (insufficient balance)")
            }
            StopReason::Rejected { status, count, .. } => {
                format!("{count} requests in a row were rejected with {status}")
            }
            StopReason::Interrupted => "interrupted".into(),
            StopReason::Refused { .. } => "soft labels cannot be made (the reason follows)".into(),
            StopReason::Finished => return,
        };
        self.println(&format!(
            "gen-data: stopping: {why}; waiting for {in_flight} request(s) in flight"
        ));
    }
}
