"""Training: pretraining (`pretrain`) and chat finetuning (`finetune`) over one accelerate loop (`loop`).

- `config`: `RunConfig` (the settings both share) and the YAML / `--key value` parser;
- `optim`: which parameters Muon trains, the optimizer, the learning-rate schedule;
- `checkpoint`: atomic, weights-only, exactly resumable checkpoints owned by one run;
- `loop`: `run_training`, the loop itself, with the optimizer step, logging, history and the final folder;
- `pretrain`, `finetune`: each run's settings, data, evaluation and samples, and its command
  (`llamathink-pretrain`, `llamathink-finetune`; `train_hf.py` and `finetune_chat.py` are the same commands for
  `accelerate launch`).
"""
