//! Parameters by name: the trainable set, their gradients collected from several backward
//! passes, and the visitors that read and replace them. Names are HF tensor names
//! (`model.layers.0.self_attn.q_proj.weight`), LoRA factors end in `.lora.lora_a` / `.lora_b`.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

/// Gradients of trainable parameters, flattened, keyed by parameter id.
pub struct GradStore<B: Backend> {
    grads: BTreeMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> Default for GradStore<B> {
    fn default() -> Self {
        GradStore {
            grads: BTreeMap::new(),
        }
    }
}

impl<B: Backend> GradStore<B> {
    /// Adds `grad` to what is stored for `id` (a parameter may get gradients from several
    /// backward passes: micro-batches, or tied embeddings used in two segments).
    pub fn add(&mut self, id: ParamId, grad: Tensor<B, 1>) {
        let merged = match self.grads.remove(&id) {
            Some(acc) => acc + grad,
            None => grad,
        };
        self.grads.insert(id, merged);
    }

    pub fn get(&self, id: &ParamId) -> Option<&Tensor<B, 1>> {
        self.grads.get(id)
    }

    /// Removes and returns the gradient of `id`.
    pub fn take(&mut self, id: &ParamId) -> Option<Tensor<B, 1>> {
        self.grads.remove(id)
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Every trainable parameter of `module`, in visiting order: its id, element count and
    /// whether it has a gradient here.
    pub fn presence<AD, M>(&self, module: &M) -> Vec<(ParamId, usize, bool)>
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: Module<AD>,
    {
        struct Presence<'a, AD: AutodiffBackend> {
            store: &'a GradStore<AD::InnerBackend>,
            out: Vec<(ParamId, usize, bool)>,
        }
        impl<AD: AutodiffBackend> ModuleVisitor<AD> for Presence<'_, AD> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
                let value = param.val();
                if value.is_require_grad() {
                    let n = value.shape().num_elements();
                    self.out.push((param.id, n, self.store.get(&param.id).is_some()));
                }
            }
        }
        let mut visitor = Presence::<AD> {
            store: self,
            out: Vec::new(),
        };
        module.visit(&mut visitor);
        visitor.out
    }
}

/// Collects the gradients in `grads` of every trainable parameter of `module` into `store`.
pub fn collect_grads<AD: AutodiffBackend, M: Module<AD>>(
    module: &M,
    grads: &AD::Gradients,
    store: &mut GradStore<AD::InnerBackend>,
) {
    struct Collector<'a, AD: AutodiffBackend> {
        grads: &'a AD::Gradients,
        store: &'a mut GradStore<AD::InnerBackend>,
    }
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for Collector<'_, AD> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                let n = g.shape().num_elements();
                self.store.add(param.id, g.reshape([n]));
            }
        }
    }
    module.visit(&mut Collector::<AD> { grads, store });
}

/// Name, id, shape and trainability of every float parameter, in visiting order.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub name: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    walk(module, |_| false)
        .into_iter()
        .map(|(info, _)| info)
        .collect()
}

/// Values of the named parameters as flattened host f32, for checkpoints and export.
pub fn read_params<B: Backend, M: Module<B>>(
    module: &M,
    want: impl Fn(&ParamInfo) -> bool,
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    walk(module, want)
        .into_iter()
        .filter_map(|(info, data)| Some((info.name, (info.shape, data?))))
        .collect()
}

/// Every float parameter with its HF name, and its values on the host where `fetch` says so.
fn walk<B: Backend, M: Module<B>>(
    module: &M,
    fetch: impl Fn(&ParamInfo) -> bool,
) -> Vec<(ParamInfo, Option<Vec<f32>>)> {
    struct Walker<F> {
        path: Vec<String>,
        fetch: F,
        out: Vec<(ParamInfo, Option<Vec<f32>>)>,
    }
    impl<B: Backend, F: Fn(&ParamInfo) -> bool> ModuleVisitor<B> for Walker<F> {
        // An enum module's variant is not part of the HF name (`q_proj.weight`, not
        // `q_proj.weight.Dense`).
        fn enter_module(&mut self, name: &str, container: &str) {
            if !container.starts_with("Enum:") {
                self.path.push(name.to_string());
            }
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            if !container.starts_with("Enum:") {
                self.path.pop();
            }
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let info = ParamInfo {
                name: self.path.join("."),
                id: param.id,
                shape: value.dims().to_vec(),
                trainable: value.is_require_grad(),
            };
            let data = (self.fetch)(&info).then(|| {
                value
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("float data")
            });
            self.out.push((info, data));
        }
    }
    let mut walker = Walker {
        path: Vec::new(),
        fetch,
        out: Vec::new(),
    };
    module.visit(&mut walker);
    walker.out
}
