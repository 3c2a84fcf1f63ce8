"""The PyTorch side of each `distill bench` case: the same workloads with HF transformers and
PEFT, random init from the same config.json, bf16, SDPA attention, AdamW.

Training (B3, B4, B5) mirrors `distill train`'s step: one micro-batch of batch x seq random
tokens, every position a loss token, loss = 0.5 * KL(teacher top-k + rest bucket) + 0.5 * CE
computed chunk by chunk from the final hidden states (each chunk's logits live only inside
its own backward, then the hidden-state gradient goes back through the model in one
backward), global-norm clipping at 1.0, AdamW (lr 1e-5, wd 0.01 on matrices). Full
fine-tuning keeps f32 weights under bf16 autocast (f32 master weights, as distill); LoRA
keeps the base in bf16 and PEFT's adapters in f32 under the same autocast. `--loss hf` uses
the model's own loss (full logits) instead, for comparison with plain HF training.
"""

import math
import time

import torch
import torch.nn.functional as F

import common


def device_of(args):
    return "cuda" if args.device.startswith("cuda") else "cpu"


def act_dtype(args):
    return torch.bfloat16 if device_of(args) == "cuda" else torch.float32


def autocast(args):
    return torch.autocast(device_of(args), dtype=act_dtype(args), enabled=device_of(args) == "cuda")


def make_model(config_dir, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    config.use_cache = False
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype)


def make_qlora_model(config_dir, device):
    """QLoRA's model as distill's `[lora] quantize = "nf4"`: the LoRA target layers as
    bitsandbytes Linear4bit (NF4, blocksize 64, no double quantization, bf16 compute), each
    drawn in bf16 on the GPU and quantized at once, so the dense model never exists (as on
    distill's side). Built on the meta device: the rest is filled as HF initialises it
    (normal(0, initializer_range), norms 1, biases 0) and the rotary tables are made again."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    config.use_cache = False
    bf16, std = torch.bfloat16, config.initializer_range
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=bf16, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=bf16, attn_implementation="sdpa")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name in common.LORA_TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=bf16, quant_type="nf4", compress_statistics=False,
                                      device="meta")
                w = torch.randn(child.out_features, child.in_features, device=device, dtype=bf16) * std
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=False,
                                             blocksize=64).to(device)
                del w
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(torch.zeros(child.out_features, device=device, dtype=bf16))
                setattr(module, name, q)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, device=device, dtype=p.dtype)
                if "norm" in type(module).__name__.lower():
                    t.fill_(1.0)
                elif name == "bias":
                    t.zero_()
                else:
                    t.normal_(0.0, std)
                setattr(module, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"QLoRA model: still on the meta device: {left[:5]}")
    return model


def synthetic_batch(batch, seq, vocab, top_k, device, seed=42):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    t_ids = torch.randint(0, vocab, (batch * seq, top_k), generator=g) if top_k else None
    t_lp = (-math.log(2.0) * torch.arange(1, top_k + 1, dtype=torch.float32)).expand(batch * seq, top_k) \
        if top_k else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(ids[:, :-1]), mv(ids[:, 1:].reshape(-1)), mv(t_ids), mv(t_lp)


def token_loss_sum(logits, labels, t_ids, t_lp, kd_ratio):
    """Sum over tokens of kd_ratio * KL + (1 - kd_ratio) * CE, in f32; the teacher's top-k
    with the rest of its mass in one extra bucket on both sides (distill's OtherBucket)."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    ce = -log_q.gather(1, labels[:, None]).sum()
    if t_ids is None or kd_ratio == 0.0:
        return ce
    lq = log_q.gather(1, t_ids)
    rest_p = torch.log(torch.clamp(1.0 - t_lp.exp().sum(1, keepdim=True), min=1e-20))
    log_p = F.log_softmax(torch.cat([t_lp, rest_p], 1), dim=1)
    rest_q = torch.log(torch.clamp(1.0 - lq.exp().sum(1, keepdim=True), min=1e-20))
    log_q_b = torch.cat([lq, rest_q], 1)
    kl = (log_p.exp() * (log_p - log_q_b)).sum()
    return kd_ratio * kl + (1.0 - kd_ratio) * ce


def chunked_loss_backward(hidden, weight, labels, t_ids, t_lp, chunk, kd_ratio, scale, args):
    """distill's chunked loss: per chunk, a detached leaf of the hidden states -> logits ->
    loss -> its own backward, so only one chunk's logits ever exist; returns (loss sum,
    gradient of the hidden states)."""
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    n = flat.shape[0]
    total = 0.0
    grads = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = flat[s:e].detach().requires_grad_(True)
        with autocast(args):
            logits = F.linear(h, weight)
        loss = token_loss_sum(logits, labels[s:e], None if t_ids is None else t_ids[s:e],
                              None if t_lp is None else t_lp[s:e], kd_ratio)
        (loss * scale).backward()
        total += loss.item()
        grads.append(h.grad)
    return total, torch.cat(grads, 0).view_as(hidden)


def hf_model(args, config_dir, lora, seq, recompute):
    """The model Trainer trains, as HF + PEFT build it: LoRA on a frozen bf16 (or NF4) base, or
    full fine-tuning on f32 master weights (bf16 autocast), with HF's non-reentrant gradient
    checkpointing when the case recomputes. `seq` is unused: other builders (the Unsloth twin's)
    size their model by it."""
    dev = device_of(args)
    if lora and args.quantize == "nf4":
        model = make_qlora_model(config_dir, dev)
    else:
        model = make_model(config_dir, act_dtype(args) if lora else torch.float32, dev)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                         target_modules=common.LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    if recompute:
        base_of(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Trainer:
    """One training step as distill's; `build(args, config_dir, lora, seq, recompute)` makes the
    model (hf_model unless a twin brings its own), everything after it is shared."""

    def __init__(self, args, config_dir, lora, batch, seq, recompute, build=None):
        dev = device_of(args)
        self.args, self.dev, self.batch, self.seq = args, dev, batch, seq
        torch.manual_seed(42)
        model = (build or hf_model)(args, config_dir, lora, seq, recompute)
        self.model = model
        self.base = base_of(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
        kw = {"fused": True} if dev == "cuda" else {}
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, **kw)
        vocab = self.base.config.vocab_size
        self.ids, self.labels, self.t_ids, self.t_lp = synthetic_batch(batch, seq, vocab, args.top_k, dev)
        self.kd_ratio = 0.5 if args.top_k > 0 else 0.0

    def step(self):
        args = self.args
        n = self.batch * self.seq
        if args.loss == "hf":
            with autocast(args):
                out = self.model(input_ids=self.ids, labels=self.ids, use_cache=False)
            out.loss.backward()
            loss = out.loss.item()
        else:
            with autocast(args):
                hidden = self.base.model(input_ids=self.ids, use_cache=False).last_hidden_state
            total, grad = chunked_loss_backward(hidden, self.base.lm_head.weight, self.labels,
                                                self.t_ids, self.t_lp, args.chunk_tokens,
                                                self.kd_ratio, 1.0 / n, args)
            hidden.backward(grad)
            loss = total / n
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def bench_train(args, config_dir, lora, batch, seq, recompute, warmup, steps, build=None):
    tr = Trainer(args, config_dir, lora, batch, seq, recompute, build)
    common.sync(tr.dev)
    seconds, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = tr.step()
        common.sync(tr.dev)
        dt = time.perf_counter() - t0
        if i >= warmup:
            seconds.append(dt)
            losses.append(loss)
    return seconds, losses


def bench_gemm(args, m, k, n, warmup, iters):
    """Forward x @ w (F.linear, w stored [n, k] as nn.Linear does) and forward + backward
    (gradients of x and w from a ones seed), mean seconds each."""
    dev, dt = device_of(args), act_dtype(args)
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    ones = torch.ones(m, n, device=dev, dtype=dt)

    def fwd():
        F.linear(x, w)

    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def fwd_bwd():
        y = F.linear(xg, wg)
        torch.autograd.grad(y, (xg, wg), grad_outputs=ones)

    return time_pair(args, warmup, iters, fwd, fwd_bwd)


def time_pair(args, warmup, iters, a, b):
    dev = device_of(args)
    return common.time_calls(dev, warmup, iters, a), common.time_calls(dev, warmup, iters, b)


def bench_loss(args, shape, tokens, chunk, warmup, iters):
    dev, dt = device_of(args), act_dtype(args)
    torch.manual_seed(7)
    hidden = torch.randn(tokens, shape.hidden, device=dev, dtype=dt)
    weight = torch.randn(shape.vocab, shape.hidden, device=dev, dtype=dt) * 0.02
    _, labels, t_ids, t_lp = synthetic_batch(1, tokens, shape.vocab, args.top_k, dev, seed=11)
    kd = 0.5 if args.top_k > 0 else 0.0

    def call():
        chunked_loss_backward(hidden, weight, labels, t_ids, t_lp, chunk, kd, 1.0 / tokens, args)

    return common.time_calls(dev, warmup, iters, call)


@torch.inference_mode()
def bench_generate(args, config_dir, batch):
    dev = device_of(args)
    torch.manual_seed(42)
    model = make_model(config_dir, act_dtype(args), dev).eval()
    model.config.use_cache = True
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(5)
    samples = max(1, min(args.gen_samples, batch))
    prompts = -(-batch // samples)
    ids = torch.randint(0, vocab, (prompts, args.prompt_len), generator=g)
    ids = ids.repeat_interleave(samples, dim=0)[:batch].to(dev)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False, use_cache=True, pad_token_id=0)
    if args.gen_temperature > 0:
        kw.update(do_sample=True, temperature=args.gen_temperature, top_p=args.gen_top_p, top_k=0)
    for _ in range(min(args.warmup, 1)):
        model.generate(ids, **kw)
    common.sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    common.sync(dev)
    secs = time.perf_counter() - t0
    new_tokens = (out.shape[1] - args.prompt_len) * batch
    return secs, new_tokens


def peak_memory_extra(args):
    if device_of(args) != "cuda":
        return {}
    return {"torch_max_allocated_gib": torch.cuda.max_memory_allocated() / common.GIB,
            "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / common.GIB}


def versions():
    import transformers

    v = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import peft

        v += f", peft {peft.__version__}"
    except ImportError:
        pass
    return v
