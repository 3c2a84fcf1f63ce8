#!/usr/bin/env python3
"""The Unsloth twin of bench.py's LoRA and QLoRA training cases (`bench.py --unsloth`).

Unsloth loads its models with `FastLanguageModel.from_pretrained`, which wants a model
directory (weights and a tokenizer), not a bare config.json. So each config gets one: the
same random init as workloads.make_model (bf16, torch.manual_seed(42), built on the GPU where
there is one, as the PyTorch twin builds it), saved as safetensors with a small byte-level
tokenizer beside it, under $UNSLOTH_TWIN_CACHE (default /tmp/distill-unsloth-models)/<config
name>. A directory is reused while its marker file names the same config.json; it is written
to a temporary directory and renamed, so a crash leaves no half model. Building runs in a
process of its own (this file as a script), so neither Unsloth's patches nor the build's
memory reach the measured case:

    python3 bench/pytorch/unsloth_twin.py CONFIG_DIR [--device cuda|cpu]

prints the directory, building it first if needed (the 7B one writes 15 GB: worth doing
before a timed run, which would otherwise spend its time limit on it).

The training step is workloads.Trainer's, on the model `build_model` returns: the same
synthetic batch, chunked KL + CE from the final hidden states, clipping and fused AdamW over
the same trainable parameters (the LoRA A/B matrices, in f32).
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import common

DEFAULT_CACHE = "/tmp/distill-unsloth-models"
MARKER = "distill-unsloth-twin.json"
# The chat specials of Qwen2.5's tokenizer; eos and pad as Qwen2.5-Instruct's (distinct, so
# Unsloth's pad-token repair, unsloth_zoo/pad_token.py fix_pad_token, leaves them alone).
EOS, PAD = "<|im_end|>", "<|endoftext|>"
SPECIALS = [PAD, "<|im_start|>", EOS]


# --- the model directory ------------------------------------------------------------------

def model_dir(config_dir):
    root = os.environ.get("UNSLOTH_TWIN_CACHE") or DEFAULT_CACHE
    return os.path.join(root, os.path.basename(os.path.normpath(config_dir)))


def config_digest(config_dir):
    with open(os.path.join(config_dir, "config.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_complete(path, config_dir):
    """The marker is the last file written before the rename, and names the config it was built from."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("config_sha256") == config_digest(config_dir)
    except (OSError, ValueError):
        return False


def ensure_model_dir(config_dir):
    """The model directory of `config_dir`, built first (in a child process) when missing or
    stale. bench.py calls it before the case's memory watch starts, so a build is never measured."""
    path = model_dir(config_dir)
    if not is_complete(path, config_dir):
        print(f"Unsloth twin: building {path} from {config_dir}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.abspath(__file__), config_dir], check=True, stdout=sys.stderr)
    return path


def make_tokenizer():
    """259 tokens: the 256 bytes (byte-level BPE without merges) and the three specials.
    Unsloth's loader loads and patches a tokenizer with every model; the benchmark feeds token
    ids and never tokenizes. Byte-level rather than a word list because transformers 5 loads
    any qwen2 directory's tokenizer.json into its BPE Qwen2Tokenizer: this one survives that
    unchanged (text round-trips, the same ids either way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def build_model_dir(config_dir, device):
    """Writes model_dir(config_dir): the PyTorch twin's init, saved in bf16, and the tokenizer."""
    import torch
    import workloads

    path = model_dir(config_dir)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=parent)
    try:
        torch.manual_seed(42)
        model = workloads.make_model(config_dir, torch.bfloat16, device)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        make_tokenizer().save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"config_sha256": config_digest(config_dir), "config_dir": os.path.abspath(config_dir),
                       "init": "workloads.make_model, bf16, torch.manual_seed(42)", "device": device}, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_complete(path, config_dir):  # a concurrent build finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(path, ignore_errors=True)  # stale: built from another config.json of this name
        os.rename(tmp, path)
    return path


# --- the case process ---------------------------------------------------------------------

def import_unsloth():
    """Imports Unsloth, which must come before transformers in the process (it patches it on
    import). The device has no network: the Hub stays offline and the download counter that
    from_pretrained reports to (unsloth/models/_utils.py get_statistics) stays off."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
        os.environ.setdefault(var, "1")
    if "transformers" in sys.modules:
        raise RuntimeError("Unsloth twin: transformers was imported before unsloth")
    import unsloth

    # Without an accelerator `import unsloth` succeeds on its CPU backend (stock torch, none
    # of the kernels): that is not the twin.
    if getattr(unsloth, "_IS_CPU_BACKEND", False):
        raise RuntimeError("Unsloth twin: unsloth found no GPU and chose its CPU backend")
    return unsloth


def build_model(args, config_dir, lora, seq, recompute):
    """The Trainer's model, loaded and patched by Unsloth as an SFT script would.

    Where this departs from a typical Unsloth SFT run (SFTTrainer + FastLanguageModel):
    - The step is workloads.Trainer's, not the HF Trainer's: the forward goes through the inner
      Qwen2Model (Unsloth's LlamaModel_fast_forward: its RMSNorm, RoPE and fused LoRA MLP and O
      kernels, per-block torch.compile, its offloaded checkpointing; Q/K/V keep PEFT's forward,
      as Unsloth leaves them for Qwen2's biased projections) to the final hidden states, as
      UNSLOTH_RETURN_HIDDEN_STATES=1 hands them to a custom loss. The loss is distill's chunked
      KL + CE with its own backward, so Unsloth's fused lm_head + cross-entropy
      (CausalLM_fast_forward) never runs (except with --loss hf).
    - No attention mask and no position ids (one unpadded sequence per row): Unsloth's fast
      path then takes its dense causal attention (flash-attn, else xformers, else SDPA).
    - QLoRA is Unsloth's own load_in_4bit (NF4 with double quantization, compute bf16), where
      the PyTorch twin quantizes without double quantization (see make_qlora_model).
    - The random-init checkpoint and tokenizer come from model_dir, not the Hub; the config's
      max_position_embeddings stays as it is, so a seq above it would get Unsloth's automatic
      RoPE scaling (none of bench/run.sh's cases go there).
    """
    import torch
    from unsloth import FastLanguageModel

    if not lora:
        raise ValueError("Unsloth twin: LoRA and QLoRA only")
    nf4 = args.quantize == "nf4"
    checkpointing = "unsloth" if recompute else False
    model, _ = FastLanguageModel.from_pretrained(
        model_name=ensure_model_dir(config_dir), max_seq_length=seq, dtype=torch.bfloat16,
        load_in_4bit=nf4, load_in_16bit=not nf4, use_gradient_checkpointing=checkpointing,
        use_exact_model_name=True, fix_tokenizer=False, local_files_only=True, random_state=42)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0, bias="none",
        target_modules=common.LORA_TARGETS, use_gradient_checkpointing=checkpointing, random_state=42)
    # As Unsloth's trainers do when train() starts (unsloth/models/rl.py prepare_for_training_mode).
    FastLanguageModel.for_training(model)
    return model


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config_dir")
    p.add_argument("--device", choices=["cuda", "cpu"])
    a = p.parse_args(argv)
    path = model_dir(a.config_dir)
    if not is_complete(path, a.config_dir):
        import torch

        # `timeout` ends a stage with SIGTERM: exit through build_model_dir's cleanup, not around it.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        build_model_dir(a.config_dir, a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
