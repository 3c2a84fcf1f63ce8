//! The teacher side of the loss: where the KL term's distribution comes from (stored soft
//! labels, a local model, a served teacher's grades) and its targets at a micro-batch's
//! loss positions.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use distill_core::Recipe;
use distill_data::examples::{Example, Row};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_models::{CausalLm, Kernels};

use super::TrainError;
use super::step::select_positions;
use crate::loss::TeacherTargets;
use crate::soft::{SoftStats, SoftTargets};

/// Where the KL term's teacher distribution comes from.
pub enum Teacher<B: Backend> {
    /// kd_ratio = 0: CE only.
    None,
    /// A local model sharing the student's tokenizer: full-vocabulary logits.
    Local(Box<CausalLm<B>>),
    /// A local model read only at the labels: its log-probability of each (sampled) token,
    /// for the on-policy sampled-token estimator.
    LocalSampled(Box<CausalLm<B>>),
    /// A served teacher's grades of on-policy samples (their rows' keys find them).
    Graded(Box<crate::on_policy::GradedTargets>),
    /// The dataset's stored top-k soft labels.
    Stored(Box<SoftTargets>),
    /// The same targets for every micro-batch, which must have exactly their N loss
    /// positions (`distill bench`: synthetic top-k at real shapes, no dataset).
    Fixed(TeacherTargets<B>),
}

/// The teacher distribution for the KL term: the dataset's stored soft labels when it has
/// them (re-scored or captured ahead of time: no teacher in memory while training), else a
/// live local teacher when the recipe names one. KD without either is refused rather than
/// silently trained as CE.
pub(super) fn load_teacher<B: Kernels>(
    recipe: &Recipe,
    student_tokenizer: &TextTokenizer,
    settings: &HubSettings,
    device: &B::Device,
    train_set: &[Example],
    held_out: &[Example],
) -> Result<(Teacher<B>, Option<SoftStats>), TrainError> {
    if recipe.loss.kd_ratio == 0.0 {
        return Ok((Teacher::None, None));
    }
    let dataset = &recipe.data.dataset;
    if let Some((soft, stats)) =
        SoftTargets::open(dataset, student_tokenizer, train_set.iter().chain(held_out))?
    {
        if stats.aligned == 0 {
            return Err(TrainError::Refused(format!(
                "{}: no sample's soft labels line up with its tokens as the student's template renders them \
                 ({} without a record, {} misaligned); HINT: re-score with `distill gen-data --rescore`",
                distill_data::soft::soft_dir(dataset).display(),
                stats.missing,
                stats.unaligned
            )));
        }
        return Ok((Teacher::Stored(Box::new(soft)), Some(stats)));
    }
    if recipe.teacher.local_model.is_none() {
        return Err(TrainError::Refused(format!(
            "[loss] kd_ratio = {} needs the teacher's distribution, and there is none: write soft labels into {} \
             (gen-data with [soft_labels] enabled, or `distill gen-data --rescore`), or set [teacher] local_model \
             to a model sharing the student's tokenizer; or set kd_ratio = 0 to train on CE alone",
            recipe.loss.kd_ratio,
            distill_data::soft::soft_dir(dataset).display()
        )));
    }
    let teacher = load_local_teacher(recipe, student_tokenizer, settings, device)?;
    Ok((Teacher::Local(Box::new(teacher)), None))
}

/// `[teacher] local_model`, which must share the student's tokenizer.
pub(super) fn load_local_teacher<B: Kernels>(
    recipe: &Recipe,
    student_tokenizer: &TextTokenizer,
    settings: &HubSettings,
    device: &B::Device,
) -> Result<CausalLm<B>, TrainError> {
    let Some(reference) = recipe.teacher.local_model.as_deref() else {
        return Err(TrainError::Refused(
            "[teacher] local_model is unset; HINT: name a model sharing the student's tokenizer".into(),
        ));
    };
    let dir = hub::resolve(reference, settings)?;
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    if tokenizer.hash != student_tokenizer.hash {
        return Err(TrainError::Refused(format!(
            "teacher {} uses another tokenizer than the student (tokenizer.json sha256 {} vs {}); \
             full-vocabulary KD needs a shared vocabulary; HINT: use API top-k soft labels instead",
            dir.display(),
            &tokenizer.hash[..12],
            &student_tokenizer.hash[..12]
        )));
    }
    Ok(CausalLm::<B>::load_with(
        &dir,
        device,
        recipe.teacher.local_quantize,
    )?)
}

/// The teacher's distribution at the loss positions of `rows`: a local teacher's
/// full-vocabulary logits, the stored top-k, or none.
pub(crate) fn teacher_targets<B: Kernels>(
    teacher: &Teacher<B>,
    ids: Tensor<B, 2, Int>,
    docs: &[Vec<u32>],
    positions: &Tensor<B, 1, Int>,
    labels: &Tensor<B, 1, Int>,
    rows: &[Row],
    width: usize,
) -> Result<TeacherTargets<B>, TrainError> {
    let dense = |tm: &CausalLm<B>| {
        let h = select_positions(tm.hidden_states_packed(ids.clone(), docs), positions); // [N, Ct]
        TeacherTargets::Dense(fit_width(tm.logits(h.unsqueeze::<3>()).squeeze_dim(0), width))
    };
    Ok(match teacher {
        Teacher::Local(tm) => dense(tm),
        Teacher::LocalSampled(tm) => dense(tm).at_labels(labels.clone(), Some(tm.config.vocab_size)),
        Teacher::Stored(soft) => soft.for_rows(rows, &positions.device())?,
        Teacher::Graded(graded) => graded.for_rows(rows, &positions.device())?,
        Teacher::Fixed(targets) => {
            let n = positions.dims()[0];
            let rows_of = match targets {
                TeacherTargets::None => n,
                TeacherTargets::Dense(z) => z.dims()[0],
                TeacherTargets::Sparse { ids, .. } => ids.dims()[0],
                TeacherTargets::Sampled(lp) => lp.dims()[0],
            };
            if rows_of != n {
                return Err(TrainError::Refused(format!(
                    "fixed teacher targets cover {rows_of} positions, the micro-batch has {n}"
                )));
            }
            targets.clone()
        }
        Teacher::None => TeacherTargets::None,
    })
}

/// Teacher logits [N, Vt] to the student's width: extra padding columns dropped, missing
/// ones filled with a masked value (they lie past the shared tokenizer's vocabulary).
fn fit_width<B: Backend>(z: Tensor<B, 2>, width: usize) -> Tensor<B, 2> {
    let [n, v] = z.dims();
    if v == width {
        z
    } else if v > width {
        z.narrow(1, 0, width)
    } else {
        let pad = Tensor::full([n, width - v], -1e9, (&z.device(), z.dtype()));
        Tensor::cat(vec![z, pad], 1)
    }
}
