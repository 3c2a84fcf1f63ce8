//! AdamW with decoupled weight decay (none on norms and biases, i.e. 1-D parameters),
//! moments kept in f32, and the learning-rate schedule.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use distill_core::recipe::{Schedule, TrainSection};

use distill_kernels::{AdamWScalars, Fetched, Parked};
use distill_models::Kernels;

use crate::parallel::{Collective, CollectiveError};
use crate::params::GradStore;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_recipe(t: &TrainSection) -> Self {
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

/// First and second moments of one parameter, flattened.
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates applied so far (bias correction uses it).
    pub t: u64,
    /// Per parameter: views of the flat groups' moments after an update.
    moments: BTreeMap<ParamId, Moments<B>>,
    /// The flat moments of the groups the last update made, which the next update of the
    /// same group takes as they are: no copy of the moments in, and (held nowhere else once
    /// the views above are dropped) updated in place by the CUDA kernel.
    flat: Vec<FlatMoments<B>>,
    /// Parameters that get weight decay (matrices); norms and biases do not.
    pub decayed: BTreeSet<ParamId>,
    /// Most elements per flat update group ([`GROUP_ELEMS`]).
    pub group_elems: usize,
    /// Data parallelism's optimizer-state sharding (ZeRO stage 1): the worker that owns each
    /// parameter ([`owners`]) and this worker's rank. A worker keeps the moments of, and
    /// updates, only what it owns; the others' new values come from their owners. Empty:
    /// this worker owns everything.
    owners: BTreeMap<ParamId, usize>,
    rank: usize,
    /// Moments parked in host memory between updates ([`AdamW::offloading`]).
    offload: bool,
    /// Restored moments parked per parameter until their group's first update.
    restored: BTreeMap<ParamId, (Parked<B>, Parked<B>)>,
}

/// Each parameter's first and second moments, as host values.
pub type HostMoments = BTreeMap<ParamId, (Vec<f32>, Vec<f32>)>;

/// Why an update could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Parallel(#[from] CollectiveError),
    /// Moments parked in host memory could not be copied out or back (`train.offload_optimizer`).
    #[error("train.offload_optimizer: {0}")]
    Offload(String),
}

/// Which of `world` workers owns each parameter, for [`AdamW::shard`]: contiguous runs of
/// `params` (id, element count), in order, of about equal element counts.
pub fn owners(params: &[(ParamId, usize)], world: usize) -> BTreeMap<ParamId, usize> {
    let total: usize = params.iter().map(|(_, n)| n).sum::<usize>().max(1);
    let mut at = 0;
    params
        .iter()
        .map(|&(id, n)| {
            // The worker whose equal share holds the parameter's middle element.
            let owner = ((at + n / 2) * world / total).min(world - 1);
            at += n;
            (id, owner)
        })
        .collect()
}

impl<B: Backend> AdamW<B> {
    /// The moments of parameter `id`, once it has been updated or restored.
    pub fn moments(&self, id: &ParamId) -> Option<&Moments<B>> {
        self.moments.get(id)
    }

    /// Shards the optimizer's state: from now on this worker (`rank`) keeps moments for, and
    /// updates, only the parameters `owners` gives it ([`owners`]).
    pub fn shard(&mut self, owners: BTreeMap<ParamId, usize>, rank: usize) {
        self.owners = owners;
        self.rank = rank;
    }

    /// The worker that updates parameter `id`.
    pub fn owner(&self, id: &ParamId) -> usize {
        self.owners.get(id).copied().unwrap_or(0)
    }

    /// Whether this worker keeps the moments of parameter `id`.
    pub fn owns(&self, id: &ParamId) -> bool {
        self.owner(id) == self.rank
    }
}

impl<B: Kernels> AdamW<B> {
    pub fn new(config: AdamWConfig, decayed: BTreeSet<ParamId>) -> Self {
        AdamW {
            config,
            t: 0,
            moments: BTreeMap::new(),
            flat: Vec::new(),
            decayed,
            group_elems: GROUP_ELEMS,
            owners: BTreeMap::new(),
            rank: 0,
            offload: false,
            restored: BTreeMap::new(),
        }
    }

    /// With `offload`, the moments live in pinned host memory between updates
    /// (`train.offload_optimizer`, what DeepSpeed calls ZeRO-Offload, with the update still on
    /// the device): each group's moments come back one group ahead of its update and go out
    /// again after it, so the device holds about two groups' moments instead of all of them.
    pub fn offloading(mut self, offload: bool) -> Self {
        self.offload = offload;
        self
    }

    /// Sets the moments of parameter `id` (resuming from a checkpoint); parked at once when
    /// offloading.
    pub fn restore_moments(&mut self, id: ParamId, moments: Moments<B>) -> Result<(), OptimError> {
        // A flat group holding this parameter would now be stale.
        self.flat.clear();
        if self.offload {
            let park = |t| B::park(t).map_err(OptimError::Offload);
            self.restored.insert(id, (park(moments.m)?, park(moments.v)?));
        } else {
            self.moments.insert(id, moments);
        }
        Ok(())
    }

    /// Every parameter's moments as host f32 values (a checkpoint): from the device, or read
    /// from host memory where they are parked.
    pub fn host_moments(&self) -> Result<HostMoments, OptimError> {
        let mut out = BTreeMap::new();
        for f in &self.flat {
            let (m, v) = (host_values(&f.m)?, host_values(&f.v)?);
            let mut at = 0;
            for &(id, n) in &f.params {
                out.insert(id, (m[at..at + n].to_vec(), v[at..at + n].to_vec()));
                at += n;
            }
        }
        // Views of the groups above, except moments restored and not yet updated.
        for (id, mv) in &self.moments {
            let host = |t: &Tensor<B, 1>| f32_values(t.clone().into_data());
            out.entry(*id).or_insert_with(|| (host(&mv.m), host(&mv.v)));
        }
        for (id, (m, v)) in &self.restored {
            let host = |p: &Parked<B>| B::read_parked(p).map(f32_values).map_err(OptimError::Offload);
            out.insert(*id, (host(m)?, host(v)?));
        }
        Ok(out)
    }

    /// One update of every parameter that has a gradient in `grads`, each gradient taken
    /// times `grad_scale`: [`AdamW::gather`] then [`AdamW::apply`].
    pub fn step<AD, M>(&mut self, module: M, grads: GradStore<B>, lr: f64, grad_scale: f64) -> M
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: Module<AD>,
    {
        let flat = self.gather(&module, grads);
        self.apply(module, flat, lr, grad_scale, &crate::parallel::Solo)
            .expect("one worker has no one to wait for")
    }

    /// The parameters that have a gradient in `grads`, as flat groups: gradients concatenated
    /// now, values when the group is updated (decayed and undecayed parameters apart,
    /// consecutive in visiting order, up to `group_elems` elements a group). The gradient norm and the update both read them:
    /// on a GPU each op is a kernel launch, and per parameter the update took ~12 and the norm
    /// 2; per group they now take about as many, plus one copy per parameter in.
    /// Each parameter's gradient leaves `grads` as its group is made, so the per-parameter
    /// gradients and the flat copies exist side by side one group at a time, not all of them
    /// (full fine-tuning: the size of the model in f32 less).
    pub fn gather<AD, M>(&self, module: &M, mut grads: GradStore<B>) -> FlatStep<B>
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: Module<AD>,
    {
        let params = trainable_values(module, &grads);
        let workers = self.owners.values().max().map_or(1, |w| w + 1);
        let mut out = Vec::new();
        for (decayed, owner) in [true, false]
            .into_iter()
            .flat_map(|d| (0..workers).map(move |o| (d, o)))
        {
            let mine: Vec<&(ParamId, Tensor<B, 1>)> = params
                .iter()
                .filter(|(id, _)| self.decayed.contains(id) == decayed && self.owner(id) == owner)
                .collect();
            for group in groups(&mine, self.group_elems) {
                let parts: Vec<Tensor<B, 1>> = group
                    .iter()
                    .map(|(id, _)| grads.take(id).expect("gathered parameters have gradients"))
                    .collect();
                out.push(FlatGroup {
                    decayed,
                    owner,
                    params: group.iter().map(|(id, v)| (*id, v.dims()[0])).collect(),
                    values: group.iter().map(|(_, v)| v.clone()).collect(),
                    g: B::concat_f32(parts),
                });
            }
        }
        FlatStep { groups: out }
    }

    /// The AdamW update of `flat` (from [`AdamW::gather`] on this `module`), each gradient
    /// taken times `grad_scale` (global-norm clipping's factor, 1 without clipping). With a
    /// sharded state ([`AdamW::shard`]) this worker updates the groups it owns and takes the
    /// others' new values from their owners through `group`.
    pub fn apply<AD, M>(
        &mut self,
        module: M,
        flat: FlatStep<B>,
        lr: f64,
        grad_scale: f64,
        workers: &dyn Collective<B>,
    ) -> Result<M, OptimError>
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: Module<AD>,
    {
        self.t += 1;
        let mut updated = BTreeMap::new();
        // Offloading: the next group's moments come back while this one updates.
        let mut ahead = (flat.groups.iter())
            .filter(|g| self.offload && g.owner == self.rank)
            .map(|g| g.params.clone())
            .collect::<Vec<_>>()
            .into_iter();
        if let Some(first) = ahead.next() {
            self.start_fetch(&first)?;
        }
        for group in flat.groups {
            let (owner, params) = (group.owner, group.params.clone());
            let p = if owner == self.rank {
                if let Some(next) = ahead.next() {
                    self.start_fetch(&next)?;
                }
                self.update_group(group, lr, grad_scale)?
            } else {
                // Only its length counts: the owner's values come back in its place.
                group.g
            };
            let p = if workers.world() > 1 {
                workers.broadcast(owner, p)?
            } else {
                p
            };
            let mut at = 0;
            for (id, n) in params {
                updated.insert(id, p.clone().narrow(0, at, n));
                at += n;
            }
        }
        Ok(module.map(&mut Replace::<AD> {
            updated,
            _ad: std::marker::PhantomData,
        }))
    }

    /// Starts bringing back the parked moments of the group of `params`, if it has any.
    fn start_fetch(&mut self, params: &[(ParamId, usize)]) -> Result<(), OptimError> {
        if let Some(i) = self.flat.iter().position(|f| f.params == params) {
            let f = self.flat.swap_remove(i);
            let (m, v) = (f.m.fetch()?, f.v.fetch()?);
            self.flat.push(FlatMoments {
                params: f.params,
                m,
                v,
            });
        }
        Ok(())
    }

    /// AdamW on one flat group: returns the parameters' new values, flat, and keeps its
    /// moments: on the device with each parameter's a view of the group's in `self.moments`,
    /// or, offloading, parked.
    fn update_group(
        &mut self,
        group: FlatGroup<B>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<Tensor<B, 1>, OptimError> {
        let c = self.config;
        let (m, v) = self.take_moments(&group)?;
        // The values are concatenated here, a group at a time, so only one group's copy exists.
        let p = B::concat_f32(group.values); // [N]
        let g = group.g; // [N]
        // The scalar factors fold into the update's scalars: the clipping scale s into the
        // moment updates, the bias corrections on the step and eps. With bc_i = 1 - beta_i^t,
        // torch's p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) is
        //     p -= (lr sqrt(bc2)/bc1) * m / (sqrt(v) + eps sqrt(bc2)).
        let s = grad_scale;
        let t = self.t as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let decay = if group.decayed {
            1.0 - lr * c.weight_decay
        } else {
            1.0
        };
        let scalars = AdamWScalars {
            beta1: c.beta1 as f32,
            a1: ((1.0 - c.beta1) * s) as f32,
            beta2: c.beta2 as f32,
            a2: ((1.0 - c.beta2) * s * s) as f32,
            decay: decay as f32,
            step: (lr * bc2.sqrt() / bc1) as f32,
            eps: (c.eps * bc2.sqrt()) as f32,
        };
        let (p, m, v) = B::adamw(p, g, m, v, scalars);
        if self.offload {
            let park = |t| B::park(t).map(Slot::Parked).map_err(OptimError::Offload);
            let (m, v) = (park(m)?, park(v)?);
            self.flat.push(FlatMoments {
                params: group.params,
                m,
                v,
            });
            return Ok(p);
        }
        let mut at = 0;
        for &(id, n) in &group.params {
            self.moments.insert(
                id,
                Moments {
                    m: m.clone().narrow(0, at, n),
                    v: v.clone().narrow(0, at, n),
                },
            );
            at += n;
        }
        self.flat.push(FlatMoments {
            params: group.params,
            m: Slot::Device(m),
            v: Slot::Device(v),
        });
        Ok(p)
    }

    /// The group's moments as flat f32 [N] tensors: the last update's flat tensors when it
    /// made this very group (the per-parameter views dropped, so they are held nowhere else
    /// and the kernel may update them in place); zeros at the first update; else (restored
    /// from a checkpoint) the parameters' moments concatenated, zeros for any missing.
    fn take_moments(&mut self, group: &FlatGroup<B>) -> Result<(Tensor<B, 1>, Tensor<B, 1>), OptimError> {
        let mut stored: Vec<Option<Moments<B>>> = group
            .params
            .iter()
            .map(|(id, _)| self.moments.remove(id))
            .collect();
        if let Some(i) = self.flat.iter().position(|f| f.params == group.params) {
            drop(stored);
            let f = self.flat.swap_remove(i);
            return Ok((f.m.land()?, f.v.land()?));
        }
        for (slot, (id, _)) in stored.iter_mut().zip(&group.params) {
            if let Some((m, v)) = self.restored.remove(id) {
                let back = |p| Slot::Parked(p).land();
                *slot = Some(Moments {
                    m: back(m)?,
                    v: back(v)?,
                });
            }
        }
        if stored.iter().all(Option::is_none) {
            // Made flat: zeros per parameter, then concatenated, were two copies at once.
            return Ok((group.g.zeros_like(), group.g.zeros_like()));
        }
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        let mut at = 0;
        for (state, &(_, n)) in stored.into_iter().zip(&group.params) {
            let state = state.unwrap_or_else(|| Moments {
                m: group.g.clone().narrow(0, at, n).zeros_like(),
                v: group.g.clone().narrow(0, at, n).zeros_like(),
            });
            ms.push(state.m);
            vs.push(state.v);
            at += n;
        }
        Ok((B::concat_f32(ms), B::concat_f32(vs)))
    }
}

/// One flat group's moments, f32 [N], and the parameters they are laid out for.
struct FlatMoments<B: Backend> {
    params: Vec<(ParamId, usize)>,
    m: Slot<B>,
    v: Slot<B>,
}

/// Where a flat group's moment is between updates.
enum Slot<B: Backend> {
    Device(Tensor<B, 1>),
    Parked(Parked<B>),
    /// On its way back from host memory.
    Fetched(Fetched<B>),
}

impl<B: Kernels> Slot<B> {
    /// Starts the copy back of a parked moment.
    fn fetch(self) -> Result<Self, OptimError> {
        Ok(match self {
            Slot::Parked(p) => Slot::Fetched(B::fetch(p).map_err(OptimError::Offload)?),
            other => other,
        })
    }

    /// The moment on the device, for work queued from now on.
    fn land(self) -> Result<Tensor<B, 1>, OptimError> {
        match self {
            Slot::Device(t) => Ok(t),
            Slot::Parked(p) => {
                B::land(B::fetch(p).map_err(OptimError::Offload)?).map_err(OptimError::Offload)
            }
            Slot::Fetched(f) => B::land(f).map_err(OptimError::Offload),
        }
    }
}

/// A moment's values on the host, wherever it is.
fn host_values<B: Kernels>(slot: &Slot<B>) -> Result<Vec<f32>, OptimError> {
    match slot {
        Slot::Device(t) => Ok(f32_values(t.clone().into_data())),
        Slot::Parked(p) => B::read_parked(p).map(f32_values).map_err(OptimError::Offload),
        Slot::Fetched(_) => Err(OptimError::Offload("a moment read while on its way back".into())),
    }
}

fn f32_values(data: burn::tensor::TensorData) -> Vec<f32> {
    data.convert::<f32>().into_vec::<f32>().expect("converted to f32")
}

/// A step's trainable parameters as flat groups ([`AdamW::gather`]).
pub struct FlatStep<B: Backend> {
    groups: Vec<FlatGroup<B>>,
}

struct FlatGroup<B: Backend> {
    decayed: bool,
    /// The worker that updates it ([`AdamW::shard`]).
    owner: usize,
    /// Each parameter and its element count, in the order of `values` and `g`.
    params: Vec<(ParamId, usize)>,
    /// The parameters' current values, flattened (no copy: the module's own tensors).
    values: Vec<Tensor<B, 1>>,
    /// Their gradients, f32 [N].
    g: Tensor<B, 1>,
}

impl<B: Kernels> FlatStep<B> {
    /// Each group's gradients summed over the workers of `group` onto the worker that owns
    /// the group ([`AdamW::shard`]), in place there; the others keep their own share, which
    /// only the group's length is read of after this.
    pub fn reduce_to_owners(&mut self, group: &dyn Collective<B>) -> Result<(), CollectiveError> {
        for g in &mut self.groups {
            if let Some(summed) = group.reduce_sum(g.owner, g.g.clone())? {
                g.g = summed;
            }
        }
        Ok(())
    }

    /// The global gradient norm: sqrt(sum of squares) over every gradient, one read from the
    /// device. With several workers each adds up the groups it owns (whose gradients it holds
    /// summed: [`FlatStep::reduce_to_owners`]) and the partial sums are summed across them.
    pub fn grad_norm(&self, group: &dyn Collective<B>) -> Result<f64, CollectiveError> {
        let sq: Vec<Tensor<B, 1>> = self
            .groups
            .iter()
            .filter(|g| g.owner == group.rank())
            .map(|g| B::sum_squares(g.g.clone()))
            .collect();
        let mine: f64 = if sq.is_empty() {
            0.0
        } else {
            Tensor::cat(sq, 0).sum().into_scalar().elem()
        };
        let total = if group.world() > 1 {
            group.all_reduce_host(&[mine])?[0]
        } else {
            mine
        };
        Ok(total.sqrt())
    }
}

/// Most elements in one flat update group (256 MiB of f32 per tensor of the group).
pub const GROUP_ELEMS: usize = 64 << 20;

/// Consecutive runs of `params` holding at most `limit` elements (a larger parameter is a
/// group alone).
fn groups<'a, T>(
    params: &'a [&'a (ParamId, Tensor<T, 1>)],
    limit: usize,
) -> Vec<&'a [&'a (ParamId, Tensor<T, 1>)]>
where
    T: Backend,
{
    let mut out = Vec::new();
    let (mut start, mut elems) = (0, 0);
    for (i, (_, value)) in params.iter().enumerate() {
        let n = value.dims()[0];
        if i > start && elems + n > limit {
            out.push(&params[start..i]);
            (start, elems) = (i, 0);
        }
        elems += n;
    }
    if start < params.len() {
        out.push(&params[start..]);
    }
    out
}

/// Every parameter of `module` with a gradient in `grads`, in visiting order, flattened
/// (a view, not a copy).
fn trainable_values<AD, M>(
    module: &M,
    grads: &GradStore<AD::InnerBackend>,
) -> Vec<(ParamId, Tensor<AD::InnerBackend, 1>)>
where
    AD: AutodiffBackend,
    M: Module<AD>,
{
    struct Values<'a, AD: AutodiffBackend> {
        grads: &'a GradStore<AD::InnerBackend>,
        out: Vec<(ParamId, Tensor<AD::InnerBackend, 1>)>,
    }
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for Values<'_, AD> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if self.grads.get(&param.id).is_some() {
                let value = param.val().inner();
                let n = value.shape().num_elements();
                self.out.push((param.id, value.reshape([n])));
            }
        }
    }
    let mut visitor = Values::<AD> {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// Puts each updated value in place of its parameter (trainable again).
struct Replace<AD: AutodiffBackend> {
    updated: BTreeMap<ParamId, Tensor<AD::InnerBackend, 1>>,
    _ad: std::marker::PhantomData<AD>,
}

impl<AD: AutodiffBackend> ModuleMapper<AD> for Replace<AD> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
        let Some(value) = self.updated.remove(&param.id) else {
            return param;
        };
        let (id, old, mapper) = param.consume();
        let updated = Tensor::<AD, D>::from_inner(value.reshape(old.shape())).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up to `lr`, then
/// cosine or linear decay to `lr * min_lr_ratio`, or constant.
pub fn learning_rate(t: &TrainSection, step: usize, total: usize) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(t.warmup_steps).max(1);
    let progress = ((step - t.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let floor = t.lr * t.min_lr_ratio;
    match t.schedule {
        Schedule::Constant => t.lr,
        Schedule::Linear => floor + (t.lr - floor) * (1.0 - progress),
        Schedule::Cosine => floor + (t.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;
    use distill_core::testing::TestRng;

    use super::*;
    use crate::params::collect_grads;

    type AD = Autodiff<Flex>;

    /// ZeRO-1's owners: contiguous runs, every worker some when there are enough parameters,
    /// shares near equal by elements, and everything on worker 0 alone.
    #[test]
    fn owners_split_the_parameters_in_runs_of_about_equal_size() {
        let sizes = [100usize, 5, 5, 300, 40, 40, 10, 200, 1, 299];
        let params: Vec<(ParamId, usize)> = sizes.iter().map(|&n| (ParamId::new(), n)).collect();
        let of = |world| {
            let map = owners(&params, world);
            params.iter().map(|(id, _)| map[id]).collect::<Vec<_>>()
        };
        assert!(of(1).iter().all(|&o| o == 0));
        for world in [2, 3, 4] {
            let o = of(world);
            assert!(o.windows(2).all(|w| w[0] <= w[1]), "{o:?}");
            assert_eq!((o[0], o[o.len() - 1]), (0, world - 1), "{o:?}");
            let mut shares = vec![0usize; world];
            for (&n, &w) in sizes.iter().zip(&o) {
                shares[w] += n;
            }
            let fair = 1000 / world;
            assert!(
                shares.iter().all(|&s| s.abs_diff(fair) <= 300),
                "{world}: {shares:?}"
            );
        }
        assert_eq!(of(2), [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
    }

    /// N(0, std²) values from the test's own generator: burn's is one for the process, which
    /// the tests running beside this one (training runs among them) draw from too.
    fn normal<const D: usize>(rng: &mut TestRng, shape: [usize; D], std: f64) -> Tensor<AD, D> {
        let values = rng.normal_vec(shape.iter().product(), 0.0, std);
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// Two AdamW steps on y = sum(W x) against the closed form (torch.optim.AdamW semantics).
    #[test]
    fn adamw_matches_the_closed_form() {
        let device = Default::default();
        let layer: Linear<AD> = LinearConfig::new(2, 1).with_bias(false).init(&device);
        let layer = Linear {
            weight: Param::initialized(
                layer.weight.id,
                Tensor::from_data(TensorData::new(vec![0.5f32, -1.0], [2, 1]), &device).require_grad(),
            ),
            ..layer
        };
        let x = Tensor::<AD, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2]), &device);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        for scale in [1.0, 0.25] {
            check_two_steps(layer.clone(), x.clone(), cfg, scale);
        }
    }

    /// Two steps with every gradient times `scale` (clipping's factor).
    fn check_two_steps(layer: Linear<AD>, x: Tensor<AD, 2>, cfg: AdamWConfig, scale: f64) {
        let mut opt = AdamW::new(cfg, [layer.weight.id].into());
        let mut layer = layer;
        let lr = 0.01;
        // grad of sum(x W) w.r.t. W is x^T = [1, 2] at every step.
        let mut w = [0.5f64, -1.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let grads = layer.forward(x.clone()).sum().backward();
            let mut store = GradStore::default();
            collect_grads(&layer, &grads, &mut store);
            layer = opt.step::<AD, _>(layer, store, lr, scale);
            for i in 0..2 {
                let g = [1.0, 2.0][i] * scale;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                w[i] = w[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let ours: Vec<f32> = layer
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(ours[i]) - w[i]).abs() < 1e-6,
                "scale {scale}: {ours:?} vs {w:?}"
            );
        }
    }

    /// Grouping changes nothing: one group for everything, and every parameter alone (the
    /// per-parameter update the closed-form test checks), give the same weights, moments and
    /// checkpointable per-parameter state, decayed and undecayed parameters alike. Nor does
    /// parking the moments in host memory between updates (`offloading`), which leaves no
    /// moment on the device.
    #[test]
    fn flat_groups_update_like_parameters_alone() {
        let mut rng = TestRng::new(3);
        // Initialised values (LinearConfig::init is lazy: each clone would draw its own).
        let mut linear = |i: usize, o: usize| Linear {
            weight: Param::from_tensor(normal(&mut rng, [i, o], 0.5)),
            bias: Some(Param::from_tensor(normal(&mut rng, [o], 0.5))),
        };
        let net: Vec<Linear<AD>> = vec![linear(3, 4), linear(4, 2)];
        let x = normal(&mut rng, [5, 3], 1.0);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let decayed: BTreeSet<ParamId> = [net[0].weight.id, net[1].weight.id].into();
        let run = |limit: usize, offload: bool| {
            let mut opt = AdamW::new(cfg, decayed.clone()).offloading(offload);
            opt.group_elems = limit;
            let mut net = net.clone();
            for _ in 0..3 {
                let y = net[1].forward(net[0].forward(x.clone()).tanh());
                let grads = y.square().sum().backward();
                let mut store = GradStore::default();
                collect_grads(&net, &grads, &mut store);
                net = opt.step::<AD, _>(net, store, 0.05, 0.5);
            }
            let vals = |t: Tensor<Flex, 1>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
            let weights: Vec<Vec<f32>> = crate::params::param_infos(&net)
                .iter()
                .map(|p| {
                    crate::params::read_params(&net, |q| q.id == p.id)
                        .into_values()
                        .next()
                        .unwrap()
                        .1
                })
                .collect();
            let on_device: Vec<Vec<f32>> = opt
                .moments
                .values()
                .map(|m| [vals(m.m.clone()), vals(m.v.clone())].concat())
                .collect();
            let host: Vec<Vec<f32>> = opt
                .host_moments()
                .unwrap()
                .into_values()
                .map(|(m, v)| [m, v].concat())
                .collect();
            if offload {
                assert!(on_device.is_empty(), "parked moments left views on the device");
            } else {
                assert_eq!(on_device, host);
            }
            (weights, host)
        };
        let together = run(usize::MAX, false);
        assert_eq!(together.0.len(), 4, "two weights, two biases");
        for other in [run(1, false), run(usize::MAX, true), run(1, true)] {
            for (a, b) in together
                .0
                .iter()
                .chain(&together.1)
                .zip(other.0.iter().chain(&other.1))
            {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }

    /// Restored moments replace what the optimizer holds, flat groups included: after
    /// zeroing every parameter's moments, a step equals a fresh optimizer's second step.
    #[test]
    fn restored_moments_replace_the_flat_groups() {
        let device = Default::default();
        let mut rng = TestRng::new(5);
        let layer = Linear {
            weight: Param::from_tensor(normal(&mut rng, [3, 2], 0.5)),
            bias: Some(Param::from_tensor(normal(&mut rng, [2], 0.5))),
        };
        let x = normal(&mut rng, [4, 3], 1.0);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let step = |opt: &mut AdamW<Flex>, layer: Linear<AD>| {
            let grads = layer.forward(x.clone()).square().sum().backward();
            let mut store = GradStore::default();
            collect_grads(&layer, &grads, &mut store);
            opt.step::<AD, _>(layer, store, 0.1, 1.0)
        };
        let weight = |l: &Linear<AD>| l.weight.val().inner().into_data().to_vec::<f32>().unwrap();
        let ids = [layer.weight.id, layer.bias.as_ref().unwrap().id];

        let mut used = AdamW::new(cfg, BTreeSet::new());
        let once = step(&mut used, layer);
        for id in ids {
            let zeros = || Tensor::<Flex, 1>::zeros([6], &device);
            let n = if id == ids[0] { 6 } else { 2 };
            used.restore_moments(
                id,
                Moments {
                    m: zeros().narrow(0, 0, n),
                    v: zeros().narrow(0, 0, n),
                },
            )
            .unwrap();
        }
        let mut fresh = AdamW::new(cfg, BTreeSet::new());
        fresh.t = 1;
        let want = weight(&step(&mut fresh, once.clone()));
        let got = weight(&step(&mut used, once));
        assert_eq!(got, want);
    }

    /// The flat groups' norm is the global gradient norm: y = sum(W x + b) with x = [1, 2]
    /// has gradients [1, 2] for W and [1] for b, norm sqrt(6), in one group or two.
    #[test]
    fn gathered_grad_norm_is_the_global_norm() {
        let device = Default::default();
        let layer = Linear::<AD> {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![0.5f32, -1.0], [2, 1]),
                &device,
            )),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![0.0f32], [1]),
                &device,
            ))),
        };
        let x = Tensor::<AD, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2]), &device);
        let grads = layer.forward(x).sum().backward();
        let store = || {
            let mut store = GradStore::default();
            collect_grads(&layer, &grads, &mut store);
            store
        };
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        for decayed in [BTreeSet::new(), [layer.weight.id].into()] {
            let opt = AdamW::<Flex>::new(cfg, decayed);
            let norm = opt
                .gather::<AD, _>(&layer, store())
                .grad_norm(&crate::parallel::Solo)
                .unwrap();
            assert!((norm - 6f64.sqrt()).abs() < 1e-6, "{norm}");
        }
        let empty = AdamW::<Flex>::new(cfg, BTreeSet::new()).gather::<AD, _>(&layer, GradStore::default());
        assert_eq!(empty.grad_norm(&crate::parallel::Solo).unwrap(), 0.0);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let t = TrainSection {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(learning_rate(&t, 0, 14), 0.25);
        assert_eq!(learning_rate(&t, 3, 14), 1.0);
        assert!((learning_rate(&t, 4, 14) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 9, 14) - 0.55).abs() < 1e-12, "cosine midpoint");
        assert!((learning_rate(&t, 14, 14) - 0.1).abs() < 1e-12);
        let lin = TrainSection {
            schedule: Schedule::Linear,
            ..t.clone()
        };
        assert!((learning_rate(&lin, 9, 14) - 0.55).abs() < 1e-12);
        let constant = TrainSection {
            schedule: Schedule::Constant,
            ..t
        };
        assert_eq!(learning_rate(&constant, 10, 14), 1.0);
    }
}
