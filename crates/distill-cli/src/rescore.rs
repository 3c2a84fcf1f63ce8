//! `distill gen-data --recipe R --rescore`: a local teacher re-scores the dataset's samples
//! teacher-forced and writes its top-k log-probabilities as soft labels (`<dataset>/soft/`).

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::Recipe;
use distill_eval::rescore::{RescoreSpec, RescoreSummary, rescore};
use distill_models::Kernels;

use crate::backend::{DeviceArg, Job, run_on};
use crate::progress::StageBars;

pub fn run(recipe: &Recipe, teacher: Option<String>, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let Some(teacher) = teacher.or_else(|| recipe.teacher.local_model.clone()) else {
        anyhow::bail!(
            "re-scoring needs a local teacher: set [teacher] local_model in the recipe or pass --teacher MODEL \
             (a model sharing the student's vocabulary)"
        );
    };
    let spec = RescoreSpec {
        dataset: recipe.data.dataset.clone(),
        teacher,
        student: Some(recipe.student.model.clone()),
        k: recipe.soft_labels.k,
        dtype: recipe.soft_labels.dtype,
        seq_len: recipe.train.seq_len,
    };
    let summary = run_on(DeviceArg::resolve(device), RescoreJob { spec: spec.clone() })?;
    let c = summary.store.counts;
    println!(
        "re-scored {} samples with {} ({} were already scored): {} samples, {} tokens, top-{} at {:.1} bytes/token in {}",
        summary.scored,
        spec.teacher,
        summary.already_present,
        c.samples,
        c.tokens,
        spec.k,
        summary.store.bytes_per_token,
        distill_data::soft::soft_dir(&spec.dataset).display()
    );
    Ok(())
}

struct RescoreJob {
    spec: RescoreSpec,
}

impl Job for RescoreJob {
    type Output = RescoreSummary;

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<RescoreSummary>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        Ok(rescore::<B>(&self.spec, &device, &StageBars::default())?)
    }
}
