#!/bin/bash
# finlora's GPU path (cuda, bf16) end to end, on a machine that has a GPU but not the model.
#
# Run from the repository root: bash benchmarks/gpu_check.sh. $D (default .devdata, kept out of
# git) holds what the machine lacks: site/ (pure-Python packages missing there, e.g. gguf,
# rouge_score, nltk), smol/ (SmolLM2's config.json, tokenizer and chat template files, copied
# from ~/.cache/finlora/models/*), and Sentences_AllAgree.txt (Financial PhraseBank). The model
# is SmolLM2-135M's architecture with random weights: this checks that every path runs and how
# fast, not what it learns. Results under $OUT when set, else /tmp. QUICK=1 stops after generate.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "classify train on cuda (auto precision), 60 steps"
timeout 120 $F train configs/fpb-smollm2-lora.yaml $FPB --set train.max_steps=60 -o /tmp/r1 --no-progress
step "classify eval + predict"
timeout 60 $F eval /tmp/r1 --json --no-progress | tail -c 400; echo
timeout 60 $F predict /tmp/r1 "Net sales fell 12 % to EUR 3.1 mn ." 
python3 -c "import json; m=json.load(open('/tmp/r1/manifest.json')); print('manifest device', m['device'], m['precision'], m['attention'], m['timings'])"
step "instruct train on cuda, 1 epoch"
timeout 120 $F train configs/fin-instruct-smollm2-lora.yaml --set model.name=/tmp/smol --set train.epochs=1 -o /tmp/r2 --no-progress
step "instruct eval + generate"
timeout 90 $F eval /tmp/r2 --json --max-new-tokens 32 --no-progress | tail -c 400; echo
timeout 60 $F generate /tmp/r2 --instruction "What is EBITDA?" --max-new-tokens 16
[ -n "${QUICK:-}" ] && { step done; exit 0; }  # QUICK=1: the train/eval/predict/generate paths only
step "methods on cuda: prefix, ia3, full (10 steps each)"
for m in prefix ia3 full; do timeout 90 $F train configs/fpb-smollm2-lora.yaml $FPB --set method.name=$m --set train.max_steps=10 -o /tmp/m-$m --no-progress 2>&1 | tail -2; done
step "bench train on cuda"
timeout 150 $F bench train configs/fpb-smollm2-lora.yaml $FPB -n 128 --rounds 2 --json 2>&1 | tail -c 1500 | tee $OUT/bench_train_cuda.txt
step "bench infer on cuda"
timeout 120 $F bench infer configs/fpb-smollm2-lora.yaml $FPB -n 64 --rounds 1 --json 2>&1 | tail -c 1500 | tee $OUT/bench_infer_cuda.txt
step "bench train on 2 CPU cores of this host (bf16 if it has avx512_bf16/amx)"
timeout 200 taskset -c 0,1 $F bench train configs/fpb-smollm2-lora.yaml $FPB --set train.device=cpu --set speed.threads=2 -n 32 --rounds 1 --json 2>&1 | tail -c 1500 | tee $OUT/bench_train_cpu2.txt
step "bench infer on 2 CPU cores of this host"
timeout 170 taskset -c 0,1 $F bench infer configs/fpb-smollm2-lora.yaml $FPB --set train.device=cpu --set speed.threads=2 -n 32 --rounds 1 --json 2>&1 | tail -c 1500 | tee $OUT/bench_infer_cpu2.txt
step done
