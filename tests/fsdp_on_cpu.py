"""`run_clip.py` for `torchrun` with FSDP on the CPU, for the tests: accelerate (1.16) turns FSDP on for GPUs and other
accelerators only, and on the CPU wraps the model in DDP instead (clip-trainer refuses that run). This launcher makes
accelerate take the FSDP plugin the Trainer gives it on the CPU too, and lets clip-trainer's check pass; everything
else, accelerate's FSDP2 wrapping, sharded checkpoints and the gathered final save included, is the code a GPU run
goes through. `torch.distributed.fsdp.fully_shard` itself supports the CPU with gloo.

    torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py configs/fsdp.json --use_cpu true ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate.state  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import clip_trainer.validation  # noqa: E402

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # What accelerate does for a GPU run's plugin (AcceleratorState.__init__), here for the CPU's.
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
clip_trainer.validation.accelerate_shards_on = lambda device: True

if __name__ == "__main__":
    from clip_trainer.cli import run_command

    sys.exit(run_command(sys.argv[1:]))
