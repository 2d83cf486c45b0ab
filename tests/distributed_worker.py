"""A training script for torchrun that uses gptlib's Python API, as a user's own script would.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py MODE OUT_DIR

MODE "train": every process saves the weights it ends with as OUT_DIR/rank<r>.pt (the command line saves rank 0's
only). "fail-on-rank-1": rank 1 alone meets a bad input in set-up. "fail-on-rank-0-in-training": rank 0 alone fails
at step 3, while rank 1 waits for its gradients. "other-data-on-rank-1": rank 1 reads other text.
"""

import sys
from pathlib import Path

import torch

from gptlib import GPTConfig, GPTModel, TrainConfig, train, window_loader
from gptlib.distributed import OtherRankFailed, session
from gptlib.errors import UserInputError
from gptlib.tokenizer import encode


def main(mode: str, out: Path) -> int:
    with session("cpu") as world:
        if mode == "fail-on-rank-1" and world.rank == 1:
            raise UserInputError("data.txt: rank 1 cannot read its copy")
        words = "other words" if mode == "other-data-on-rank-1" and world.rank == 1 else "cats and dogs"
        text = " ".join(f"line {i} of a small corpus about {words}." for i in range(80))
        torch.manual_seed(0)
        model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                                   drop_rate=0.0))
        loader = window_loader(encode(text), length=16, batch_size=6, seed=5)
        def on_step(step, loss):
            if mode == "fail-on-rank-0-in-training" and world.rank == 0 and step == 3:
                raise UserInputError("the disk is full (rank 0, while training)")
        train(model, loader, cfg=TrainConfig(max_steps=5, lr=3e-3, eval_every=5, eval_batches=2, progress=False,
                                             device="cpu", precision="fp32"), world=world, on_step=on_step)
        torch.save(model.state_dict(), out / f"rank{world.rank}.pt")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1], Path(sys.argv[2])))
    except OtherRankFailed as exc:  # another process reports
        sys.exit(exc.exit_code)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
