"""Building blocks several test modules share."""

from corpus import corpus
from gpt2repro.checkpoint import save_checkpoint, save_model_dir
from gpt2repro.data import prepare
from gpt2repro.presets import load_train_config
from gpt2repro.train import build_optimizer


def optimizer_for(model, weight_decay=0.1, lr=1e-3):
    return build_optimizer(model.named_parameters(), weight_decay, lr)[0]


def checkpoint_state(model, optimizer, trainer: dict) -> dict:
    """What Trainer.state_dict() returns, for a model and optimizer built by hand."""
    return {"model_config": model.config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "trainer": trainer}


def write_checkpoint(root, step, model, optimizer, trainer: dict, **options):
    return save_checkpoint(root, step, checkpoint_state(model, optimizer, trainer), **options)


def write_model_dir(model, path):
    return save_model_dir(path, model.config, model.state_dict())


# a small model with the real tokenizer: fast on 2 CPU cores, same code paths as the 124M recipe
SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "seq_len=32",
         "micro_batch_size=4", "total_batch_size=512", "warmup_steps=2", "val_batches=4", "num_samples=1",
         "sample_max_new_tokens=8", "seed=7"]


def small_config(*overrides: str):
    return load_train_config("tiny", None, SMALL + list(overrides))


def shakespeare_data(tmp_path_factory):
    """Tiny Shakespeare prepared with 4,096 validation tokens, for a module's `data_dir` fixture."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    return prepare([str(corpus("tinyshakespeare.txt"))], out, val_tokens=4096, shard_size=100_000,
                   num_workers=1, progress=False)
