"""`run_clip.py` for `torchrun` with DeepSpeed on the CPU, for the tests (run by the Python of `.venv-deepspeed`, with
`DS_ACCELERATOR=cpu`): accelerate (1.16) leaves DeepSpeed out of a `use_cpu` run, and on a machine without an
accelerator it counts one process where `torchrun` started several, so DeepSpeed's batch check fails. This launcher
makes accelerate see the CPU processes `torchrun` started (gloo), as it does for DDP on the CPU, and lets clip-trainer's
check pass; everything else (the DeepSpeed engine, its checkpoints, the gathered final save) is the code a GPU run goes
through.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/deepspeed_on_cpu.py --deepspeed zero2.json ...
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate.state  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import clip_trainer.validation  # noqa: E402

_prepare_backend = accelerate.state.PartialState._prepare_backend


def _prepare_cpu_processes(self, cpu=False, sagemaker_dp=False, backend=None):
    chosen, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if distributed_type == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU  # what accelerate chooses for `use_cpu` under torchrun
    return chosen, distributed_type


accelerate.state.PartialState._prepare_backend = _prepare_cpu_processes
clip_trainer.validation.accelerate_shards_on = lambda device: True

if __name__ == "__main__":
    from clip_trainer.cli import run_command

    sys.exit(run_command(sys.argv[1:]))
