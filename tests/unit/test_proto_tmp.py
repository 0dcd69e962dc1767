import time
from pathlib import Path
import pytest
def test_x(tiny_cfg, tiny_seq2seq_dir, tmp_path):
    from finlora.train import train
    t=time.time()
    cfg=tiny_cfg("train.max_steps=30","train.epochs=10","train.learning_rate=0.01")
    r=train(cfg, tmp_path/"run", progress_bar=False)
    print(r, time.time()-t)
    print((tmp_path/"run"/"metrics.jsonl").read_text()[:3000])
    from finlora.models.loading import load_base_model
    b=load_base_model(str(tiny_seq2seq_dir)); print(b.kind)
    print(sorted(p.name for p in (tmp_path/"run").iterdir()))
