"""Chat finetuning of a pretrained LlamaThink model (the entry point; the code is `llamathink.train.finetune`).

    accelerate launch [--config_file accelerate_configs/...] finetune_chat.py \
        --config configuration/finetune/<preset>.yaml [--key value ...]

The same as the `llamathink-finetune` command: settings from a YAML file plus `--key value` overrides of any
`llamathink.train.finetune.FinetuneConfig` field; the finished model, with the chat template in its tokenizer, in
`<out_dir>/final` (`llamathink-chat <out_dir>/final`).
"""

import sys

from llamathink.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
