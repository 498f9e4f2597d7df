"""The job layer: a job's config (`schema`), its run metadata (`runmeta`), the model it assembles
(`assemble`), its objective (`objectives`, a plug-in per ``objective.kind``) and the commands
built on them: training (`training`), evaluation (`evaluate`), the memory plan (`plan`) and RLAIF
labelling (`label`).

    from jaxtune.job import TrainJobConfig, run_training, run_eval_job
    from jaxtune.config import from_dict, load_config
    job = load_config(TrainJobConfig, "configs/sft_lora_llama_small.yaml", ["train.steps=100"])
    result = run_training(job)
"""

from jaxtune.job.assemble import load_model
from jaxtune.job.evaluate import run_eval_job
from jaxtune.job.plan import plan_step
from jaxtune.job.schema import JobConfig, ModelSource, ObjectiveConfig, TokenizerConfig, TrainJobConfig
from jaxtune.job.training import run_training, setup_training

__all__ = [
    "JobConfig", "ModelSource", "ObjectiveConfig", "TokenizerConfig", "TrainJobConfig", "load_model", "plan_step",
    "run_eval_job", "run_training", "setup_training",
]
