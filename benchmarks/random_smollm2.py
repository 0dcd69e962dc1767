"""A model directory with SmolLM2-135M's architecture and tokenizer but random weights.

python benchmarks/random_smollm2.py SRC DST: SRC holds the real model's config.json and tokenizer
files (no weights), DST gets safetensors weights beside copies of them. For speed checks on
machines the real weights cannot reach (benchmarks/gpu_check.sh).
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
cfg = AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("random model", sum(p.numel() for p in model.parameters()), "params at", dst)
