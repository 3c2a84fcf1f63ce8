//! The plan: every case of the selected benchmarks, in the order they run. Parent and child
//! build the same plan from the same arguments, so a case is named by its index.

use crate::Args;

/// One unit of work, run in its own process.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Case {
    /// The square GEMM MFU is measured against.
    Peak,
    Gemm(usize),
    /// One layer's attention alone at each --attention-seq.
    Attention(usize),
    Loss {
        config: usize,
        /// One [tokens, V] block of logits (as a full-logits loss), else --chunk-tokens.
        naive: bool,
        /// Differentiate with burn's autodiff instead of the closed-form gradient.
        autodiff: bool,
    },
    Train {
        config: usize,
        lora: bool,
    },
    Memory(usize),
    Generate {
        config: usize,
        batch: usize,
    },
}

const ALL: [&str; 7] = ["B1", "attention", "B2", "B3", "B4", "B5", "B6"];

fn selected(args: &Args) -> anyhow::Result<Vec<&'static str>> {
    let names: Vec<&String> = args.which.iter().chain(&args.only).collect();
    if names.is_empty() {
        return Ok(ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in names {
        let ids: &[&'static str] = match name.to_ascii_lowercase().as_str() {
            "b1" | "gemm" => &["B1"],
            "attention" => &["attention"],
            "b2" | "loss" => &["B2"],
            "b3" | "lora" => &["B3"],
            "b4" | "full" => &["B4"],
            "train" => &["B3", "B4"],
            "b5" | "memory" => &["B5"],
            "b6" | "generate" => &["B6"],
            "all" => &ALL,
            other => anyhow::bail!(
                "unknown benchmark `{other}`; use gemm, attention, loss, lora, full, train, memory, generate or B1..B6"
            ),
        };
        out.extend(ids);
    }
    Ok(ALL.iter().copied().filter(|b| out.contains(b)).collect())
}

/// Every case, benchmark by benchmark, config by config; the peak first. Parent and child
/// build the same plan from the same arguments, so a case is named by its index.
pub(crate) fn plan(args: &Args) -> anyhow::Result<Vec<Case>> {
    let mut cases = vec![Case::Peak];
    for b in selected(args)? {
        for config in 0..args.configs.len() {
            match b {
                "B1" => cases.push(Case::Gemm(config)),
                "attention" => cases.push(Case::Attention(config)),
                "B2" => {
                    for (naive, autodiff) in [(false, false), (false, true), (true, true)] {
                        cases.push(Case::Loss {
                            config,
                            naive,
                            autodiff,
                        });
                    }
                }
                "B3" => cases.push(Case::Train { config, lora: true }),
                "B4" => cases.push(Case::Train { config, lora: false }),
                "B5" => cases.push(Case::Memory(config)),
                "B6" => cases.extend(
                    args.gen_batch
                        .iter()
                        .map(|&batch| Case::Generate { config, batch }),
                ),
                _ => unreachable!(),
            }
        }
    }
    Ok(cases)
}

pub(crate) fn case_bench(case: &Case) -> &'static str {
    match case {
        Case::Peak => "peak",
        Case::Gemm(_) | Case::Attention(_) => "B1",
        Case::Loss { .. } => "B2",
        Case::Train { lora: true, .. } => "B3",
        Case::Train { lora: false, .. } => "B4",
        Case::Memory(_) => "B5",
        Case::Generate { .. } => "B6",
    }
}

pub(crate) fn case_config(case: &Case) -> Option<usize> {
    match *case {
        Case::Peak => None,
        Case::Gemm(c) | Case::Attention(c) | Case::Memory(c) => Some(c),
        Case::Loss { config, .. } | Case::Train { config, .. } | Case::Generate { config, .. } => {
            Some(config)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let argv = [&["distill-bench", "--config", "a", "--config", "b"][..], extra].concat();
        <Cli as clap::Parser>::parse_from(argv).args
    }

    #[test]
    fn names_and_issue_numbers_select_the_same_cases() {
        let by_name = plan(&args(&["gemm", "train"])).unwrap();
        let by_id = plan(&args(&["--only", "B4,B1,B3"])).unwrap();
        assert_eq!(by_name, by_id);
        assert_eq!(
            by_name,
            vec![
                Case::Peak,
                Case::Gemm(0),
                Case::Gemm(1),
                Case::Train {
                    config: 0,
                    lora: true
                },
                Case::Train {
                    config: 1,
                    lora: true
                },
                Case::Train {
                    config: 0,
                    lora: false
                },
                Case::Train {
                    config: 1,
                    lora: false
                },
            ]
        );
        assert_eq!(
            plan(&args(&[])).unwrap().len(),
            1 + 2 * (1 + 1 + 3 + 1 + 1 + 1 + 1)
        );
        assert_eq!(
            plan(&args(&["attention"])).unwrap(),
            vec![Case::Peak, Case::Attention(0), Case::Attention(1)]
        );
        let gen_cases = plan(&args(&["generate", "--gen-batch", "1,64"])).unwrap();
        assert_eq!(gen_cases.len(), 1 + 2 * 2);
        assert!(plan(&args(&["B9"])).is_err());
    }
}
