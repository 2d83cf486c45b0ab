"""gptlib: a small, readable GPT-2 style language model library for the gptlib workbook.

The public names below are all a notebook or script needs; each lives in a module with one job.
"""

from .checkpoint import Checkpoint, load_model, read_checkpoint, save_checkpoint
from .classify import GPTClassifier, load_classifier, predict_proba
from .config import PRESETS, GPTConfig, preset
from .data import (InstructionCollator, InstructionDataset, TokenWindows, instruction_loader, window_loader,
                   with_replay)
from .device import pick_device, set_seed
from .errors import CheckpointError, DataError, UserInputError
from .evaluate import bits_per_character, evaluate_loss, exact_match, is_degenerate, known_word_share, perplexity, rouge_l
from .hf import from_hf, load_pretrained, to_hf  # transformers is imported only when these are called
from .generate import (SamplingSettings, answer_instruction, answer_instructions, generate, generate_batch, generate_text,
                       stream)
from .instructions import Example, format_prompt, load_jsonl, split_examples
from .model import GPTModel, KVCache
from .tokenizer import EOT_ID, GPT2, BPETokenizer, GPT2Tokenizer, decode, encode, get_tokenizer, train_bpe
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"
