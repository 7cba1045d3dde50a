"""`ftkit rl`: group-relative policy optimization of a DiffusionGemma LoRA adapter, with the task's own verifier as
reward and the diffusion ELBO as the sequence likelihood (docs/rl.md).

objective.py  advantages, clipped ratio, KL, sample entropy: pure tensor functions
likelihood.py the per-token ELBO estimate under given corruption draws; the reference policy
rollout.py    a round: prompts -> G canvases each from the eval sampler -> rewards -> advantages
trainer.py    RLTrainer (a transformers.Trainer): rounds, several optimizer steps per round, logging
run.py        the `ftkit rl` pipeline: recipe -> run directory -> before/after evaluation
"""
