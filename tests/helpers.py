"""Building blocks several test modules share."""

from gpt2repro.checkpoint import save_checkpoint, save_model_dir
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
