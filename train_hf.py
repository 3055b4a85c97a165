"""Pretrain LlamaThink with Hugging Face accelerate and Muon (the entry point; the code is `llamathink.train`).

    accelerate launch [--config_file accelerate_configs/...] train_hf.py --config configuration/train/<preset>.yaml \
        [--key value ...]

The same as the `llamathink-pretrain` command: settings from a YAML file plus `--key value` overrides of any
`llamathink.train.pretrain.TrainConfig` field; checkpoints and exact resume in `<out_dir>/checkpoints`, the finished
model in `<out_dir>/final`.
"""

import sys

from llamathink.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
