"""DistributedDataParallel: full replicas, gradients all-reduced on the last micro-step only."""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_scale.engines.base import Engine, adamw, prepare_model
from gpt2_scale.model import GPT
from gpt2_scale.optim import param_groups


class DDPEngine(Engine):
    # Gradients are views into DDP's all-reduce buckets (one copy of 4Ψ instead of two), and are zeroed in place
    # rather than freed so that they stay views: setting them to None would allocate fresh ones next step.
    zero_grads_to_none = False

    def setup(self, model: GPT) -> None:
        prepare_model(model, self.cfg.engine, self.runtime)
        self.module = model
        device_ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
        self.model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.optimizer = adamw(param_groups(model, self.cfg.optim.weight_decay), self.cfg, self.env.device)

    def autocast(self):
        return self.runtime.autocast()

    def _set_sync(self, sync: bool) -> None:
        # What DDP.no_sync() sets, without a context manager spanning forward and backward.
        self.model.require_backward_grad_sync = sync

    def close(self) -> None:
        """Drop the DDP wrapper: its reducer holds the process group and the gradient hooks on the parameters
        (removed when the reducer is freed), so a model the caller still holds keeps neither."""
        super().close()
