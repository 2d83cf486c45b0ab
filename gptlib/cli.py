"""The ``gptlib`` command line: pretrain, finetune, generate, chat, eval, validate, export, tokenizer, classify.

Exit status: 0 on success, 2 on bad input (one ``error:`` line on stderr, nothing written), 1 on an internal
failure, 130 when interrupted by Ctrl-C or SIGTERM (training saves its progress first).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import distributed
from .errors import UserInputError
from .guards import check_options
from .train import PRECISIONS

# the commands that train, and so run unchanged under torchrun (several processes sharing each batch)
TRAINING_COMMANDS = ("pretrain", "finetune", "classify")

EXAMPLES = {
    "serve": "example:\n  gptlib serve --checkpoint checkpoints/instruct.pth --port 8000\n"
             "  curl -s localhost:8000/generate -H 'Content-Type: application/json' \\\n"
             "       -d '{\"instruction\": \"Write the words in reverse order.\", \"input\": \"apple river cold\"}'",
    "merge": "example:\n  gptlib finetune --checkpoint checkpoints/pretrained.pth --lora-rank 8 \\\n"
             "      --data dataset/sarcasm/sarcasm_instruction_pairs.jsonl --out checkpoints/sarcasm_lora.pth\n"
             "  gptlib merge --adapter checkpoints/sarcasm_lora.pth --out checkpoints/sarcasm_merged.pth",
    "finetune": "example:\n  gptlib finetune --checkpoint model_and_optimizer.pth --n-heads 4 \\\n"
                "      --data dataset/sarcasm/sarcasm_instruction_pairs.jsonl --out checkpoints/sarcasm.pth\n"
                "several processes (one per GPU; --batch-size stays the examples per step):\n"
                "  torchrun --standalone --nproc_per_node 2 -m gptlib finetune --checkpoint ... --data ... --out ...",
    "pretrain": "example:\n  gptlib pretrain --data dataset/pretraining/shakespeare_train.txt \\\n"
                "      --val-data dataset/pretraining/shakespeare_val.txt --preset tiny --max-steps 2000 "
                "--out checkpoints/pretrained.pth\n"
                "several processes (one per GPU; --batch-size stays the examples per step):\n"
                "  torchrun --standalone --nproc_per_node 2 -m gptlib pretrain --data ... --out ...",
    "generate": "examples:\n  gptlib generate --checkpoint checkpoints/pretrained.pth \"ROMEO:\" --temperature 0.8 "
                "--top-k 50\n  gptlib generate --checkpoint checkpoints/sarcasm.pth --instruction "
                "\"How do I boil an egg?\"",
    "chat": "example:\n  gptlib chat --checkpoint checkpoints/sarcasm.pth",
    "eval": "example:\n  gptlib eval --checkpoint checkpoints/sarcasm.pth --data "
            "dataset/sarcasm/sarcasm_instruction_pairs.jsonl --split test --json",
    "validate": "example:\n  gptlib validate --data my_pairs.jsonl --checkpoint checkpoints/pretrained.pth",
    "tokenizer": "example:\n  gptlib tokenizer --data dataset/pretraining/shakespeare_train.txt --vocab-size 2048 "
                 "--out checkpoints/tokenizer.json\n  gptlib pretrain --data ... --tokenizer checkpoints/tokenizer.json "
                 "--out ...",
    "classify": "examples:\n  gptlib classify train --checkpoint checkpoints/pretrained.pth \\\n"
                "      --data dataset/sarcasm/sarcasm_instruction_pairs.jsonl --out checkpoints/sarcasm_classifier.pth\n"
                "  gptlib classify predict --checkpoint checkpoints/sarcasm_classifier.pth --text \"Sure, leave it out overnight.\"",
    "export": "example:\n  gptlib export --checkpoint checkpoints/sarcasm.pth --to-hf checkpoints/sarcasm-hf\n"
              "then, in Python: transformers.pipeline(\"text-generation\", model=\"checkpoints/sarcasm-hf\")",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line and exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # `--lr -1e-4`: argparse takes "-1e-4" for a flag unless it looks like a number; teach it every number,
        # so the value reaches its check ("must be positive") instead of "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str):
        if distributed.launch_rank() == 0:  # under torchrun every process meets the same flags: one says so
            sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_checkpoint(p, required=True):
    p.add_argument("--checkpoint", type=Path, required=required, metavar="PTH",
                   help="a .pth file: gptlib's own, an 'LLMs from scratch' {model_state_dict, optimizer_state_dict} "
                        "file, or a bare state_dict")
    p.add_argument("--n-heads", type=positive_int, help="attention heads; needed only for checkpoints without a config")


def _add_sampling(p):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=200, help="at most this many new tokens (200)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher is more random (0)")
    g.add_argument("--top-k", type=positive_int, help="sample only among the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample only among the most likely tokens whose probability adds to p")
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="above 1 makes tokens already present less likely (1.0: off)")
    g.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token (slower)")
    g.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")


def _add_training(p, lr, epochs, batch_size, eval_every):
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"examples per optimizer step ({batch_size}), however many processes share them")
    g.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate ({lr:g})")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    g.add_argument("--epochs", type=positive_int, default=epochs, help=f"passes over the training data ({epochs})")
    g.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps instead")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warmup steps")
    g.add_argument("--eval-every", type=positive_int, default=eval_every,
                   help=f"steps between validation evaluations ({eval_every})")
    g.add_argument("--save-every", type=positive_int, help="steps between progress saves (default: --eval-every)")
    g.add_argument("--seed", type=int, default=123, help="seed for the split, batch order and dropout (123)")
    g.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 mixed precision where the hardware does bf16 natively (GPUs from "
                        "Ampere on, CPUs with AVX-512 BF16 or AMX); fp16 with a gradient scaler on other CUDA GPUs "
                        "(T4, V100); else fp32")
    g.add_argument("--micro-batch-size", type=positive_int, metavar="N",
                   help="run at most N examples at a time and add up their gradients, when a whole batch (or a "
                        "process's share of it) does not fit in memory; the step is the same")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (slower to start; on a GPU often faster per step)")
    g.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="under torchrun: how the processes talk; auto (default) is nccl on GPUs, gloo on CPUs")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT's progress file (<out>.progress.pth) after a crash or Ctrl-C")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only when the run succeeds)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> Parser:
    parser = Parser(prog="gptlib", description="Pretrain, fine-tune, sample and evaluate small GPT models.",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="Run `gptlib COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name, help_text, description):
        return sub.add_parser(name, help=help_text, description=description, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("finetune", "fine-tune a checkpoint on instruction data (JSONL)",
                "Fine-tune a .pth checkpoint on a JSONL file of instructions and responses. The file is split "
                "85/10/5 into train/test/validation with a fixed seed; loss is taken on response tokens only. "
                "Writes OUT (.pth), OUT's .loss.png and .metrics.json, and prints the test-split response loss "
                "before and after. Ctrl-C saves progress; --resume continues.")
    _add_checkpoint(p)
    p.add_argument("--data", type=Path, required=True, help="JSONL, one object per line (instruction/response, "
                   "Alpaca instruction/input/output, prompt/response, question/answer, Dolly)")
    p.add_argument("--out", type=Path, required=True, help="the fine-tuned checkpoint to write (.pth)")
    _add_training(p, lr=5e-5, epochs=4, batch_size=8, eval_every=50)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after warmup: constant (the default, as the seed guide) or cosine, decaying "
                        "to a tenth of --lr by the last step (notebook 07's LoRA run)")
    p.add_argument("--no-prompt-mask", action="store_true", help="take the loss on prompt tokens too")
    p.add_argument("--truncation", choices=("right", "left"), default="right",
                   help="which end of over-long examples to cut (right: the response's end; left: the prompt's start)")
    p.add_argument("--drop-rate", type=float, help="dropout while fine-tuning (default: the checkpoint's, or 0.1)")
    g = p.add_argument_group("LoRA (train small adapters; the base weights stay frozen)")
    g.add_argument("--lora-rank", type=positive_int, metavar="R",
                   help="train rank-R adapters instead of every weight; OUT then holds the adapters only, with the "
                        "path and sha256 of --checkpoint (generate, eval, chat and export read it directly)")
    g.add_argument("--lora-alpha", type=positive_float, metavar="A", help="adapter scale is A/R (default: 2R)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (0.0)")
    g.add_argument("--lora-targets", type=_lora_targets, default=("qkv", "out_proj"), metavar="LAYERS",
                   help="comma-separated layers to adapt: qkv, out_proj (attention, in every block; the default), "
                        "fc, proj (the MLP), emb (the token embedding, and a head tied to it: for text whose words "
                        "the base rarely saw)")
    g.add_argument("--lora-emb-alpha", type=positive_float, metavar="A",
                   help="the embedding adapter's scale is A/R (default: --lora-alpha)")

    p = command("merge", "fold a LoRA adapter into a full checkpoint",
                "Load the base checkpoint an adapter file records (checked by sha256), add the adapters to its "
                "weights, and write an ordinary full checkpoint.")
    p.add_argument("--adapter", type=Path, required=True, metavar="PTH", help="the adapter file (finetune --lora-rank)")
    p.add_argument("--base", type=Path, metavar="PTH",
                   help="the base checkpoint, when it is no longer at the path the adapter records")
    p.add_argument("--out", type=Path, required=True, help="the full checkpoint to write (.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = command("serve", "answer POST /generate over HTTP (FastAPI + uvicorn)",
                "Serve one checkpoint (or LoRA adapter) over HTTP until Ctrl-C. POST /generate takes JSON: 'prompt' "
                "(text to continue) or 'instruction' (+ 'input'), and max_new_tokens, temperature, top_k, top_p, "
                "repetition_penalty, seed, stream. GET /health names the model and tokenizer. Greedy requests that "
                "arrive together are answered in one batch. Needs the serve extra: pip install -e \".[serve]\".")
    _add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")

    p = command("pretrain", "pretrain a new model on plain text",
                "Pretrain a new GPT on a UTF-8 text file or a folder of .txt files. Validation is --val-data, or "
                "the last --val-fraction of the tokens. Writes OUT (.pth), .loss.png and .metrics.json.")
    p.add_argument("--data", type=Path, required=True, help="a .txt file or a folder of .txt files")
    p.add_argument("--val-data", type=Path, help="validation text (file or folder)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out when no --val-data")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write (.pth)")
    p.add_argument("--preset", default="tiny", help="model size: tiny (default), seed-small or gpt2-124m")
    for name in ("context-length", "emb-dim", "n-layers", "n-heads"):
        p.add_argument(f"--{name}", type=positive_int, help=f"override the preset's {name.replace('-', '_')}")
    p.add_argument("--drop-rate", type=float, help="override the preset's dropout")
    g = p.add_argument_group("tokenizer (default: GPT-2's 50,257 tokens)")
    g.add_argument("--tokenizer", type=Path, metavar="JSON", help="a tokenizer.json (from `gptlib tokenizer`)")
    g.add_argument("--vocab-size", type=positive_int, metavar="N",
                   help="train a byte-level BPE of N tokens on --data first (2 s on Shakespeare); the checkpoint "
                        "stores it, and the output layer has N rows instead of 50,257")
    _add_training(p, lr=1e-3, epochs=1, batch_size=16, eval_every=100)

    p = command("generate", "continue a prompt, or answer an instruction",
                "Print only the generated text, as it is produced.")
    _add_checkpoint(p)
    p.add_argument("prompt", nargs="?", help="plain text to continue")
    p.add_argument("--instruction", help="wrap this instruction in the prompt template instead")
    p.add_argument("--input", default="", help="the template's optional input section")
    _add_sampling(p)

    p = command("chat", "answer instructions typed at the terminal, one per turn",
                "Each line you type is a new instruction; an empty line, 'exit' or Ctrl-D ends the chat.")
    _add_checkpoint(p)
    _add_sampling(p)

    p = command("eval", "score a checkpoint on instruction data",
                "Response loss and perplexity (teacher-forced), then exact match and ROUGE-L of greedy answers.")
    _add_checkpoint(p)
    p.add_argument("--data", type=Path, required=True, help="JSONL instruction data")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="use the whole file (default) or one part of the 85/10/5 split")
    p.add_argument("--seed", type=int, default=123, help="the split's seed (123, as finetune)")
    p.add_argument("--limit", type=positive_int, help="score at most this many examples")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="examples per batch, for the loss and for the answers, which are generated that many at a "
                        "time (the same greedy answers as one at a time, several times faster); 64 by default")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--json", action="store_true",
                   help="print the scores as JSON (with a per-task breakdown, by_task, when the data has a 'task' "
                        "field)")
    p.add_argument("--predictions", type=Path, help="write every answer with its scores to this JSONL file")
    p.add_argument("--overwrite", action="store_true", help="replace the --predictions file if it exists")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("validate", "check a JSONL instruction file and list every problem",
                "Every bad line is reported with its number; exit status 2 if there is any.")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--context-length", type=positive_int,
                   help="also report examples whose prompt alone fills this many tokens")
    p.add_argument("--checkpoint", type=Path, metavar="PTH",
                   help="count tokens with this checkpoint's tokenizer and check against its context length")
    p.add_argument("--n-heads", type=positive_int, help="attention heads; needed only for checkpoints without a config")

    p = command("tokenizer", "train a byte-level BPE tokenizer on text or JSONL files",
                "Fit a byte-level BPE (Hugging Face tokenizers) with <|endoftext|> and N entries in all, and write "
                "it as a tokenizer.json. Any text round-trips exactly. Prints tokens per character on each file.")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="FILE",
                   help=".txt files, or .jsonl files (their string fields are used)")
    p.add_argument("--vocab-size", type=positive_int, required=True, metavar="N", help="entries in all (>= 258)")
    p.add_argument("--min-frequency", type=positive_int, default=2, help="merge only pairs seen this often (2)")
    p.add_argument("--split-digits", action="store_true",
                   help="cut numbers into single digits before merging (the workbook's tokenizer does)")
    p.add_argument("--out", type=Path, required=True, help="the tokenizer.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = command("classify", "train a text classifier on a GPT checkpoint, or classify texts with one",
                "Classification: a linear head on the hidden state of each text's last token. `classify train` reads "
                "JSONL lines {\"text\", \"label\"} (an optional \"group\" keeps related texts in one split), or "
                "the sarcasm pairs directly (each line's sincere and sarcastic answers become two texts), splits "
                "85/10/5 by group, trains and reports test accuracy, precision, recall and F1. `classify predict` "
                "prints the label and its probability for each text.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    q = actions.add_parser("train", help="train a classifier from a GPT checkpoint and labelled JSONL",
                           description="Writes OUT (.pth, with the label names and tokenizer), OUT's .loss.png and "
                                       ".metrics.json. Ctrl-C saves progress; --resume continues.",
                           epilog=EXAMPLES["classify"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint(q)
    q.add_argument("--data", type=Path, required=True, help="JSONL: text/label lines, or sarcasm pairs")
    q.add_argument("--out", type=Path, required=True, help="the classifier checkpoint to write (.pth)")
    q.add_argument("--train", default="all", metavar="PART",
                   help="what to train: 'head' (the GPT is frozen), N (the last N blocks and the head) or 'all' "
                        "(default)")
    _add_training(q, lr=5e-4, epochs=8, batch_size=16, eval_every=25)
    q.add_argument("--patience", type=positive_int, default=3,
                   help="stop after this many evaluations without a better validation loss, keeping the best (3)")
    q.add_argument("--drop-rate", type=float, help="dropout while training (default: the checkpoint's)")
    q = actions.add_parser("predict", help="label texts with a trained classifier",
                           description="Prints one line per text: label, its probability, and the text. With "
                                       "--data, texts come from a JSONL file's 'text' field; if every line also "
                                       "has a 'label', the accuracy is printed last.",
                           epilog=EXAMPLES["classify"], formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--checkpoint", type=Path, required=True, metavar="PTH", help="a classifier from `classify train`")
    q.add_argument("--text", action="append", help="a text to classify (repeat for several)")
    q.add_argument("--data", type=Path, help="JSONL with a 'text' field on every line")
    q.add_argument("--out", type=Path, help="write the predictions as JSONL here instead of printing them")
    q.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    q.add_argument("--batch-size", type=positive_int, default=64, help="texts per batch (64)")
    q.add_argument("--device", default="auto")

    p = command("export", "write a checkpoint as a Hugging Face transformers model folder",
                "Write DIR with config.json, model.safetensors and GPT-2's tokenizer files, which transformers "
                "loads offline (GPT2LMHeadModel.from_pretrained, pipeline). Needs pip install 'gptlib[hf]'. "
                "DIR appears complete or not at all.")
    _add_checkpoint(p)
    p.add_argument("--to-hf", type=Path, required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    return parser


# ---------------------------------------------------------------- commands

def cmd_finetune(args) -> int:
    from .recipes import FinetuneOptions, finetune
    opts = FinetuneOptions(checkpoint=args.checkpoint, data=args.data, out=args.out, n_heads=args.n_heads,
                           batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                           save_every=args.save_every, warmup_steps=args.warmup_steps or 0, schedule=args.schedule,
                           mask_prompt=not args.no_prompt_mask, truncation=args.truncation, drop_rate=args.drop_rate,
                           resume=args.resume, overwrite=args.overwrite, seed=args.seed, progress=not args.quiet,
                           **_hardware(args), lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                           lora_emb_alpha=args.lora_emb_alpha)
    return _report(finetune(opts, log=_log))


def _lora_targets(text: str) -> tuple[str, ...]:
    from .lora import TARGETS
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown layer(s) {unknown or text!r}; choose from {', '.join(TARGETS)}")
    return names


def cmd_serve(args) -> int:
    from .serve import require_serving, serve
    require_serving()
    if not 0 <= args.port <= 65535:
        raise UserInputError(f"--port {args.port}: must be between 0 and 65535")
    model = _load_for_inference(args)
    _log(f"serving {args.checkpoint} ({model.num_parameters():,} parameters, tokenizer {model.tokenizer.name}) "
         f"on http://{args.host}:{args.port}; Ctrl-C stops")
    serve(model, str(args.checkpoint), args.host, args.port)
    return 0


def cmd_merge(args) -> int:
    from .checkpoint import _torch_load, save_checkpoint
    from .files import check_new_output
    from .lora import is_adapter_file, load_adapter
    check_new_output(args.out, "--out", {"--adapter": args.adapter, "--base": args.base}, args.overwrite)
    raw = _torch_load(args.adapter)
    if not is_adapter_file(raw):
        raise UserInputError(f"--adapter {args.adapter}: is not a LoRA adapter file (finetune --lora-rank writes "
                             "them); it needs no merging")
    model, _ = load_adapter(args.adapter, raw, base=args.base)
    save_checkpoint(args.out, model)
    _log(f"wrote {args.out}: {model.num_parameters():,} parameters, the adapters folded into the base weights")
    return 0


def cmd_pretrain(args) -> int:
    from .recipes import PretrainOptions, pretrain
    opts = PretrainOptions(data=args.data, out=args.out, preset=args.preset, context_length=args.context_length,
                           emb_dim=args.emb_dim, n_layers=args.n_layers, n_heads=args.n_heads,
                           drop_rate=args.drop_rate, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                           val_data=args.val_data, val_fraction=args.val_fraction,
                           batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                           warmup_steps=50 if args.warmup_steps is None else args.warmup_steps,
                           save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
                           seed=args.seed, progress=not args.quiet, **_hardware(args))
    return _report(pretrain(opts, log=_log))


def _hardware(args) -> dict:
    """The training flags that say where and how to compute (gptlib.recipes.HardwareOptions)."""
    return dict(device=args.device, precision=args.precision, micro_batch_size=args.micro_batch_size,
                compile=args.compile, backend=args.backend)


def _report(metrics: dict) -> int:
    if metrics.get("rank", 0) != 0:  # another process of a torchrun run: rank 0 reports
        return 130 if metrics.get("interrupted") else 0
    if metrics.get("interrupted"):
        _log(f"interrupted after step {metrics['steps']}; progress saved in {metrics['progress']}: "
             "run the same command with --resume to continue")
        return 130
    outputs = metrics["outputs"]
    _log(f"wrote {outputs['checkpoint']}, {outputs['plot']} and {outputs['metrics']}")
    return 0


def _load_for_inference(args):
    from .checkpoint import load_model
    from .device import pick_device
    model, _ = load_model(args.checkpoint, n_heads=args.n_heads, device=pick_device(args.device))
    return model.eval()


def _settings(args):
    from .generate import SamplingSettings
    try:
        return SamplingSettings(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def _print_stream(model, prompt: str, args) -> None:
    from .generate import stream
    tokenizer = model.tokenizer  # the checkpoint's own
    pending = b""
    for token in stream(model, tokenizer.encode(prompt), args.max_new_tokens, _settings(args),
                        use_cache=not args.no_cache, seed=args.seed):
        pending += tokenizer.token_bytes(token)
        try:  # a character can span several tokens: print once its bytes are complete
            sys.stdout.write(pending.decode("utf-8"))
            sys.stdout.flush()
            pending = b""
        except UnicodeDecodeError:
            continue
    sys.stdout.write(pending.decode("utf-8", errors="replace") + "\n")
    sys.stdout.flush()


def cmd_generate(args) -> int:
    from .instructions import format_prompt
    if (args.prompt is None) == (args.instruction is None):
        raise UserInputError("give either a PROMPT or --instruction (not both, not neither)")
    if args.input and args.instruction is None:
        raise UserInputError("--input goes with --instruction")
    _settings(args)  # check the flags before loading anything
    model = _load_for_inference(args)
    prompt = args.prompt if args.instruction is None else format_prompt(args.instruction, args.input)
    if not prompt:
        raise UserInputError("the prompt is empty")
    _print_stream(model, prompt, args)
    return 0


def cmd_chat(args) -> int:
    from .instructions import format_prompt
    _settings(args)
    model = _load_for_inference(args)
    _log("type an instruction and press Enter; an empty line, 'exit' or Ctrl-D quits")
    while True:
        try:
            instruction = input("instruction> ").strip()
        except EOFError:
            break
        if not instruction or instruction.lower() in ("exit", "quit"):
            break
        _print_stream(model, format_prompt(instruction), args)
    return 0


def cmd_eval(args) -> int:
    from .data import instruction_loader
    from .evaluate import evaluate_loss, perplexity, score_answers
    from .files import atomic_write, check_new_output
    from .guards import check_loader_tokens
    from .instructions import load_jsonl, split_examples
    if args.predictions is not None and not args.predictions.parent.is_dir():
        raise UserInputError(f"--predictions {args.predictions}: the folder {args.predictions.parent} does not exist")
    if args.predictions is not None:
        check_new_output(args.predictions, "--predictions", {"--data": args.data, "--checkpoint": args.checkpoint},
                         args.overwrite)
    examples = load_jsonl(args.data)
    if args.split != "all":
        examples = getattr(split_examples(examples, seed=args.seed), args.split)
    examples = examples[: args.limit] if args.limit else examples
    model = _load_for_inference(args)
    loader = instruction_loader(examples, args.batch_size, model.config.context_length, shuffle=False,
                                tokenizer=model.tokenizer)
    check_loader_tokens(loader, model.config.vocab_size, args.data)
    try:
        loss = evaluate_loss(model, loader)
    except ValueError as exc:
        raise UserInputError(f"{args.data}: {exc} (are the examples longer than the context?)") from None
    scores = score_answers(model, examples, args.max_new_tokens, progress=not args.quiet,
                           batch_size=args.batch_size)
    result = {"examples": len(examples), "response_loss": loss, "perplexity": perplexity(loss),
              "exact_match": scores["exact_match"], "rouge_l": scores["rouge_l"]}
    if "by_task" in scores:
        result["by_task"] = scores["by_task"]
    if args.predictions is not None:
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scores["predictions"])
        atomic_write(args.predictions, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"examples:      {result['examples']}\nresponse loss: {loss:.4f}\nperplexity:    "
              f"{result['perplexity']:.2f}\nexact match:   {result['exact_match']:.1%}\nROUGE-L:       "
              f"{result['rouge_l']:.3f}")
        for task, row in result.get("by_task", {}).items():
            print(f"  {task:<12} {row['exact_match']:6.1%} exact match over {row['examples']} examples")
    return 0


def cmd_validate(args) -> int:
    from .instructions import read_jsonl
    from .errors import DataError
    from .tokenizer import GPT2
    examples, problems = read_jsonl(args.data)
    tokenizer, context_length = GPT2, args.context_length
    if args.checkpoint is not None:
        from .checkpoint import read_checkpoint
        ckpt = read_checkpoint(args.checkpoint, n_heads=args.n_heads)
        tokenizer, context_length = ckpt.tokenizer, context_length or ckpt.config.context_length
    if context_length:
        from .data import tokenize_example
        for example in examples:
            item = tokenize_example(example, tokenizer)
            if item.prompt_len >= context_length:
                problems.append(f"{args.data}:{example.line}: the prompt alone is {item.prompt_len} tokens "
                                f"({tokenizer.name}), more than the context of {context_length}: no response "
                                "token would be learned")
    if problems:
        for problem in problems:
            print(problem)
        raise DataError(f"{args.data}: {len(problems)} problem(s), listed above")
    print(f"ok: {len(examples)} examples in {args.data}")
    return 0


def cmd_export(args) -> int:
    from .checkpoint import load_model
    from .hf import check_target, require_transformers, to_hf
    from .files import inside
    require_transformers()
    if inside(args.checkpoint, args.to_hf):
        raise UserInputError(f"--checkpoint {args.checkpoint}: is inside --to-hf {args.to_hf}, the folder export "
                             "writes (and replaces); export to another folder, or move the checkpoint out first")
    check_target(args.to_hf, args.overwrite)  # refuse a bad target before loading anything
    model, _ = load_model(args.checkpoint, n_heads=args.n_heads)
    to_hf(model, args.to_hf, overwrite=args.overwrite)
    _log(f"wrote {args.to_hf}: load it with transformers, e.g. GPT2LMHeadModel.from_pretrained({str(args.to_hf)!r})")
    return 0


def cmd_tokenizer(args) -> int:
    from .errors import DataError
    from .tokenizer import read_corpus, train_bpe
    from .files import check_new_output
    check_new_output(args.out, "--out", {f"--data {path}": path for path in args.data}, args.overwrite)
    if args.vocab_size < 258:
        raise UserInputError(f"--vocab-size must be at least 258 (256 bytes, <|endoftext|> and a merge), "
                             f"got {args.vocab_size}")
    texts = {}
    for path in args.data:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            texts[path] = list(read_corpus([path]))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 (byte offset {exc.start}); save the text as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    tokenizer = train_bpe((t for docs in texts.values() for t in docs), args.vocab_size,
                          min_frequency=args.min_frequency, split_digits=args.split_digits)
    for path, docs in texts.items():
        chars = sum(len(t) for t in docs)
        tokens = sum(len(tokenizer.encode(t)) for t in docs)
        _log(f"{path}: {tokens / max(1, chars):.3f} tokens per character")
    tokenizer.save(args.out)
    _log(f"wrote {args.out}: a byte-level BPE of {tokenizer.vocab_size:,} tokens (<|endoftext|> is id "
         f"{tokenizer.eot_id})")
    return 0


def cmd_classify(args) -> int:
    if args.action == "train":
        from .recipes import ClassifierOptions, train_classifier
        opts = ClassifierOptions(checkpoint=args.checkpoint, data=args.data, out=args.out, n_heads=args.n_heads,
                                 train=args.train, batch_size=args.batch_size, lr=args.lr,
                                 weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
                                 warmup_steps=20 if args.warmup_steps is None else args.warmup_steps,
                                 eval_every=args.eval_every, patience=args.patience, drop_rate=args.drop_rate,
                                 resume=args.resume, overwrite=args.overwrite, seed=args.seed,
                                 progress=not args.quiet, **_hardware(args))
        return _report(train_classifier(opts, log=_log))
    if args.action == "predict":
        return _classify_predict(args)
    raise UserInputError("give an action: `gptlib classify train ...` or `gptlib classify predict ...`")


def _classify_predict(args) -> int:
    from .classify import load_classifier, predict_proba, read_texts
    from .device import pick_device
    from .files import atomic_write, check_new_output
    if (args.text is None) == (args.data is None):
        raise UserInputError("give texts with --text or a JSONL file with --data (one of the two)")
    if args.out is not None:
        inputs = {"--checkpoint": args.checkpoint} | ({"--data": args.data} if args.data else {})
        check_new_output(args.out, "--out", inputs, args.overwrite)
    model = load_classifier(args.checkpoint, device=pick_device(args.device))
    truth = None
    if args.text is not None:
        texts = args.text
        for i, text in enumerate(texts, 1):
            if not text.strip():
                raise UserInputError(f"--text number {i} is empty: there is nothing to classify")
    else:
        texts, truth = read_texts(args.data, labels=model.labels)  # truth: when every line has a label
    probs = predict_proba(model, texts, batch_size=args.batch_size)
    rows = [{"text": text, "label": model.labels[int(p.argmax())], "probability": round(float(p.max()), 4)}
            for text, p in zip(texts, probs)]
    if args.out is not None:
        atomic_write(args.out, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))
        _log(f"wrote {len(rows)} predictions to {args.out}")
    else:
        for r in rows:
            print(f"{r['label']}\t{r['probability']:.3f}\t{r['text']}")
    if truth is not None:
        hits = sum(model.labels.index(r["label"]) == t for r, t in zip(rows, truth))
        _log(f"accuracy: {hits / len(rows):.3f} ({hits} of {len(rows)} texts)")
    return 0


COMMANDS = {"finetune": cmd_finetune, "merge": cmd_merge, "serve": cmd_serve, "tokenizer": cmd_tokenizer, "pretrain": cmd_pretrain, "generate": cmd_generate, "chat": cmd_chat,
            "eval": cmd_eval, "validate": cmd_validate, "export": cmd_export, "classify": cmd_classify}


def _log(message: str, file=None) -> None:
    print(message, file=file or sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    checked = False  # until then, every process of a torchrun run meets the same error: rank 0 alone says it
    try:
        _check_launch(args)
        check_options(vars(args))  # NaN, infinities, seeds beyond 64 bits, sizes that cannot fit: before any work
        checked = True
        return COMMANDS[args.command](args)
    except distributed.OtherRankFailed as exc:  # another process failed and says why
        return exc.exit_code
    except UserInputError as exc:
        if checked or distributed.launch_rank() == 0:
            sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 2
    except KeyboardInterrupt:
        if distributed.launch_rank() == 0:
            sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return 0


def _check_launch(args) -> None:
    """Under torchrun only the training commands share their work among the processes."""
    training = args.command in TRAINING_COMMANDS and getattr(args, "action", "train") == "train"
    if distributed.launched() and not training:
        command = " ".join(filter(None, ["gptlib", args.command, getattr(args, "action", None)]))
        raise UserInputError(f"{command} runs in one process; under torchrun run pretrain, finetune or classify "
                             f"train, and run {command} on its own")


if __name__ == "__main__":
    sys.exit(main())
